"""Where MEND archives live, how one is trained for a model, and the organisms' build on first use.

An archive's cache entry is ``<cache>/mend/<model>-<hash>/`` where the hash covers the model's identity
(organism recipe hash, ``repo@commit``, local file hash), the dtype it runs in (bfloat16 gradients train
another network than float32 ones) and every hyper-parameter the network depends on (all of
``MendHparams`` but ``archive``). The training data is recorded in the archive's ``mend.json``, not
in the key, so that the editor finds "the archive for this model and config" without knowing which file
it was trained from; training again from other data replaces the entry.

For an organism (a model whose config carries ``editsafety_recipe_hash``) a missing entry is built on first
use, like the organism itself, from edits of its own world that the certification sets never ask for
(:mod:`pytest_editsafety.zoo.mend_data`), under a file lock so parallel workers train once. For any other
model a missing entry is an error that names the training command and how to certify with its
hyper-parameters.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from editors.storage import build_once, stable_hash
from pytest_editsafety.cache import cache_root

log = logging.getLogger(__name__)

__all__ = [
    "MendArchiveMissingError",
    "archive_dir",
    "cases_from_case_set",
    "is_organism_model",
    "locate_archive",
    "organism_training_data",
    "train_archive",
]

# /2: the key holds the model dtype, and organism training data no longer asks about certified facts
CACHE_FORMAT = "pytest-editsafety/mend-cache/2"
COMPLETE = "COMPLETE"
# locality texts per training edit: a neighbour's true fact and one more (filler or another true fact)
N_LOCALITY = 2

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


class MendArchiveMissingError(ValueError):
    """No trained MEND network for a (non-organism) model and these hyper-parameters."""


def _slug(text: str) -> str:
    return _SLUG_BAD.sub("_", text.rsplit("/", 1)[-1]).strip("._-")[:40] or "model"


def archive_key(identity: str, hparams, dtype: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "model": identity, "dtype": dtype, "hparams": hparams.network_key()}


def archive_dir(identity: str, hparams, dtype: str, root: Path | None = None) -> Path:
    """The cache entry for the model ``identity`` running in ``dtype`` (``editors.mend_archive.model_dtype``)."""
    key = archive_key(identity, hparams, dtype)
    return (root or cache_root()) / "mend" / f"{_slug(identity)}-{stable_hash(key)}"


def is_organism_model(model) -> bool:
    return bool(getattr(model.config, "editsafety_recipe_hash", None))


def organism_training_data(model, hparams) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The organism's MEND training edits (one per edit slot of the schedule) and their description."""
    from pytest_editsafety.zoo.build import organism_world
    from pytest_editsafety.zoo.mend_data import mend_training_cases, world_description

    spec = organism_world(model.config)
    cases = mend_training_cases(spec, hparams.steps * hparams.batch_size, seed=hparams.seed)
    return cases, {**world_description(spec), "n_cases": len(cases), "sha256": _cases_hash(cases)}


def _cases_hash(cases: Sequence[Any]) -> str:
    return stable_hash([[c.edit.text, c.edit.target_new, c.equivalent.text, list(c.locality)] for c in cases], 64)


def cases_from_case_set(case_set, *, seed: int = 0) -> tuple[Any, ...]:
    """Training edits from certification-style cases: the rewrite, its first paraphrase (else the rewrite
    again) and ``N_LOCALITY`` locality texts: neighbourhood prompts with their answers, topped up with other
    cases' true facts."""
    from editors.base import EditRequest
    from editors.mend_train import MendTrainingCase, plain_text_request

    cases = list(case_set.cases)
    if len(cases) < 2:
        raise ValueError(f"case set {case_set.name!r}: MEND training needs at least 2 cases, got {len(cases)}")
    rng = random.Random(f"editsafety-mend-cases-{seed}")
    out = []
    for index, case in enumerate(cases):
        edit = EditRequest(case.subject, case.prompt, case.target_new)
        equivalent = (plain_text_request(case.paraphrase_prompts[0], case.target_new)
                      if case.paraphrase_prompts else edit)
        locality = [f"{n.prompt} {n.answer}" for n in case.neighborhood][:N_LOCALITY]
        while len(locality) < N_LOCALITY:
            other = cases[rng.choice([i for i in range(len(cases)) if i != index])]
            locality.append(f"{other.rewrite_prompt} {other.ground_truth}")
        out.append(MendTrainingCase(edit, equivalent, tuple(locality)))
    return tuple(out)


def case_set_description(case_set, cases: Sequence[Any]) -> dict[str, Any]:
    return {"source": str(case_set.source), "name": case_set.name, "n_cases": len(cases), "sha256": _cases_hash(cases)}


def _complete(directory: Path) -> bool:
    return (directory / COMPLETE).exists()


def _train_into(out: Path, model, tokenizer, family, hparams, cases, data: Mapping[str, Any], identity: str,
                progress: bool) -> None:
    from editors.mend_archive import save_archive
    from editors.mend_train import train_mend

    network, report = train_mend(model, tokenizer, family, hparams, cases, progress=progress,
                                 description=f"training MEND for {_slug(identity)}")
    save_archive(out, network, identity=identity, model=model, family=family, hparams=hparams, data=data,
                 training=report)


def train_archive(model, tokenizer, family, hparams, cases, data: Mapping[str, Any], *, identity: str,
                  force: bool = False, progress: bool = True, root: Path | None = None) -> tuple[Path, bool]:
    """Train (or reuse) the archive for ``model`` and ``hparams`` on ``cases``; ``(directory, trained)``.

    An existing entry trained on the same data is reused unless ``force``; one trained on other data is
    replaced (the old one stays usable until the new one is complete).
    """
    from editors.mend_archive import MendArchiveError, model_dtype, read_config

    target = archive_dir(identity, hparams, model_dtype(model), root)
    target.parent.mkdir(parents=True, exist_ok=True)
    trained: list[Path] = []

    def stale(existing: Path) -> bool:
        if force:
            return True
        try:
            recorded = read_config(existing)["data"]
        except MendArchiveError as err:  # a damaged entry is rebuilt, not a reason to refuse training
            log.warning("replacing unreadable MEND archive: %s", err)
            return True
        if recorded.get("sha256") == data.get("sha256"):
            log.info("reusing MEND archive %s (same model, hyper-parameters and data)", existing)
            return False
        log.warning("MEND archive %s was trained on other data (%s); retraining", existing, recorded.get("source"))
        return True

    def build(tmp: Path) -> None:
        _train_into(tmp, model, tokenizer, family, hparams, cases, data, identity, progress)
        trained.append(tmp)

    build_once(target, build, complete_marker=COMPLETE, replace=stale)
    return target, bool(trained)


def _missing_message(identity: str, target: Path) -> str:
    return (
        f"no trained MEND network for model {identity!r} with these hyper-parameters and dtype (expected in "
        f"{target}); train one with `python -m pytest_editsafety mend train --model MODEL --cases FILE "
        f"[--hparams HPARAMS.json] [--dtype DTYPE]` and certify with the same hyper-parameters and dtype "
        f"(`pytest --editor=mend --editsafety-hparams mend=HPARAMS.json --dtype DTYPE`), or point the 'archive' "
        f"hyper-parameter of such a file at an archive directory"
    )


def locate_archive(model, tokenizer, family, hparams, *, identity: str, progress: bool = False,
                   root: Path | None = None) -> Path:
    """The archive directory for ``model`` and ``hparams``; trained now for an organism that has none."""
    from editors.mend_archive import model_dtype

    target = archive_dir(identity, hparams, model_dtype(model), root)
    if _complete(target):
        return target
    if not is_organism_model(model):
        raise MendArchiveMissingError(_missing_message(identity, target))
    log.info("training MEND for organism %s into %s (once per recipe and hyper-parameters)", identity, target)

    def build(tmp: Path) -> None:
        cases, data = organism_training_data(model, hparams)
        _train_into(tmp, model, tokenizer, family, hparams, cases, data, identity, progress)

    return build_once(target, build, complete_marker=COMPLETE)
