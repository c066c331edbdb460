"""Where trained editor networks live, how one is trained for a model, and the organisms' build on first use.

An editor that needs a trained network declares it (:class:`editors.base.TrainedNetworkNeed`: a kind, a key of
everything the network depends on, and how to train one). Its cache entry is
``<cache>/<kind>/<model>-<hash>/`` where the hash covers the model's identity (organism recipe hash,
``repo@commit``, local file hash), the dtype it runs in (bfloat16 gradients train another network than float32
ones) and the need's key. The training data is recorded in the entry (``trained.json``), not in the key, so
the editor finds "the network for this model and config" without knowing which file it was trained from;
training again from other data replaces the entry.

For an organism a missing entry is built on first use, like the organism itself, from edits of its own world
that the certification sets never ask for (:mod:`pytest_editsafety.zoo.mend_data`), under a file lock so
parallel workers train once. For any other model a missing entry is an error that names the training command.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from editors.base import EditRequest, TrainedNetworkNeed, TrainingCase, TrainingJob
from editors.storage import atomic_write_text, build_once, slugify, stable_hash
from pytest_editsafety.organisms import is_organism_model

log = logging.getLogger(__name__)

__all__ = [
    "TrainedNetworkMissingError",
    "case_set_description",
    "cases_from_case_set",
    "locate_network",
    "network_dir",
    "organism_training_data",
    "read_record",
    "train_network",
]

CACHE_FORMAT = "pytest-editsafety/trained-network/1"
COMPLETE = "COMPLETE"
RECORD_FILE = "trained.json"
# locality texts per training edit: a neighbour's true fact and one more (filler or another true fact)
N_LOCALITY = 2


class TrainedNetworkMissingError(ValueError):
    """No trained network for a (non-organism) model and these hyper-parameters."""


def model_dtype(model) -> str:
    """The dtype ``model`` computes in (``torch.float32``): part of a trained network's key."""
    return str(next(model.parameters()).dtype)


def network_dir(need: TrainedNetworkNeed, identity: str, dtype: str, root: Path) -> Path:
    """The cache entry for the model ``identity`` running in ``dtype``."""
    key = {"format": CACHE_FORMAT, "model": identity, "dtype": dtype, "network": dict(need.key)}
    name = slugify(identity.rsplit("/", 1)[-1], fallback="model", max_length=40)
    return root / slugify(need.kind) / f"{name}-{stable_hash(key)}"


def organism_training_data(model, need: TrainedNetworkNeed) -> tuple[tuple[TrainingCase, ...], dict[str, Any]]:
    """The organism's training edits (``need.n_training_cases`` of them) and their description."""
    from pytest_editsafety.zoo.build import organism_world
    from pytest_editsafety.zoo.mend_data import mend_training_cases, world_description

    spec = organism_world(model.config)
    cases = mend_training_cases(spec, need.n_training_cases, seed=need.seed)
    return cases, {**world_description(spec), "n_cases": len(cases), "sha256": _cases_hash(cases)}


def _cases_hash(cases: Sequence[TrainingCase]) -> str:
    return stable_hash([[c.edit.text, c.edit.target_new, c.equivalent.text, list(c.locality)] for c in cases], 64)


def cases_from_case_set(case_set, *, seed: int = 0) -> tuple[TrainingCase, ...]:
    """Training edits from certification-style cases: the rewrite, its first paraphrase (else the rewrite
    again) and ``N_LOCALITY`` locality texts: neighbourhood prompts with their answers, topped up with other
    cases' true facts."""
    cases = list(case_set.cases)
    if len(cases) < 2:
        raise ValueError(f"case set {case_set.name!r}: training needs at least 2 cases, got {len(cases)}")
    rng = random.Random(f"editsafety-mend-cases-{seed}")
    out = []
    for index, case in enumerate(cases):
        edit = EditRequest(case.subject, case.prompt, case.target_new)
        # a paraphrase has no separate subject: the whole text is the request
        equivalent = (EditRequest(case.paraphrase_prompts[0], "{}", case.target_new)
                      if case.paraphrase_prompts else edit)
        locality = [f"{n.prompt} {n.answer}" for n in case.neighborhood][:N_LOCALITY]
        while len(locality) < N_LOCALITY:
            other = cases[rng.choice([i for i in range(len(cases)) if i != index])]
            locality.append(f"{other.rewrite_prompt} {other.ground_truth}")
        out.append(TrainingCase(edit, equivalent, tuple(locality)))
    return tuple(out)


def case_set_description(case_set, cases: Sequence[TrainingCase]) -> dict[str, Any]:
    return {"source": str(case_set.source), "name": case_set.name, "n_cases": len(cases), "sha256": _cases_hash(cases)}


def read_record(directory: Path) -> dict[str, Any]:
    """What a complete entry says of its training: ``{"data": ..., "training": ...}``."""
    path = Path(directory) / RECORD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable training record: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
        raise ValueError(f"{path}: malformed training record (expected an object with a 'data' object)")
    return record


def _train_into(out: Path, need: TrainedNetworkNeed, model, tokenizer, family, cases, data: Mapping[str, Any],
                identity: str, progress: bool) -> None:
    job = TrainingJob(model=model, tokenizer=tokenizer, family=family, cases=tuple(cases), data=dict(data),
                      identity=identity, directory=out, progress=progress)
    report = need.train(job)
    atomic_write_text(out / RECORD_FILE, json.dumps({"data": dict(data), "training": dict(report or {})},
                                                    indent=1, sort_keys=True))


def train_network(need: TrainedNetworkNeed, model, tokenizer, family, cases, data: Mapping[str, Any], *,
                  identity: str, root: Path, force: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Train (or reuse) the network ``need`` asks for on ``cases``; ``(directory, trained)``.

    An existing entry trained on the same data is reused unless ``force``; one trained on other data is
    replaced (the old one stays usable until the new one is complete).
    """
    target = network_dir(need, identity, model_dtype(model), root)
    trained: list[Path] = []

    def stale(existing: Path) -> bool:
        if force:
            return True
        try:
            recorded = read_record(existing)["data"]
        except ValueError as err:  # a damaged entry is rebuilt, not a reason to refuse training
            log.warning("replacing unreadable trained network: %s", err)
            return True
        if recorded.get("sha256") == data.get("sha256"):
            log.info("reusing trained network %s (same model, hyper-parameters and data)", existing)
            return False
        log.warning("trained network %s was trained on other data (%s); retraining", existing, recorded.get("source"))
        return True

    def build(tmp: Path) -> None:
        _train_into(tmp, need, model, tokenizer, family, cases, data, identity, progress)
        trained.append(tmp)

    build_once(target, build, complete_marker=COMPLETE, replace=stale)
    return target, bool(trained)


def locate_network(need: TrainedNetworkNeed, model, tokenizer, family, *, identity: str, root: Path,
                   progress: bool = False) -> Path:
    """The entry for ``need`` on ``model``; trained now for an organism that has none."""
    target = network_dir(need, identity, model_dtype(model), root)
    if (target / COMPLETE).exists():
        return target
    if not is_organism_model(model):
        raise TrainedNetworkMissingError(
            f"no trained {need.kind} network for model {identity!r} with these hyper-parameters and dtype "
            f"(expected in {target}); {need.train_hint}".rstrip("; ")
            + f"; then certify with the hyper-parameters and dtype it was trained with "
              f"(--editsafety-hparams {need.kind}=HPARAMS.json --editsafety-dtype DTYPE)")
    log.info("training %s for organism %s into %s (once per recipe and hyper-parameters)", need.kind, identity, target)

    def build(tmp: Path) -> None:
        cases, data = organism_training_data(model, need)
        _train_into(tmp, need, model, tokenizer, family, cases, data, identity, progress)

    return build_once(target, build, complete_marker=COMPLETE)
