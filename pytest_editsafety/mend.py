"""Where MEND archives live, how one is trained for a model, and the organisms' build on first use.

An archive's cache entry is ``<cache>/mend/<model>-<hash>/`` where the hash covers the model's identity
(organism recipe hash, ``repo@commit``, local file hash) and every hyper-parameter the network depends on
(all of ``MendHparams`` but ``archive``). The training data is recorded in the archive's ``mend.json``, not
in the key, so that the editor finds "the archive for this model and config" without knowing which file
it was trained from; training again from other data replaces the entry.

For an organism (a model whose config carries ``editsafety_recipe_hash``) a missing entry is built on first
use, like the organism itself, from edits of its own world that the certification sets never ask for
(:mod:`pytest_editsafety.zoo.mend_data`), under a file lock so parallel workers train once. For any other
model a missing entry is an error that names the training command.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_editsafety.cache import build_lock, build_once, cache_root, stable_hash

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

CACHE_FORMAT = "pytest-editsafety/mend-cache/1"
COMPLETE = "COMPLETE"
# locality texts per training edit: a neighbour's true fact and one more (filler or another true fact)
N_LOCALITY = 2

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._-]+")


class MendArchiveMissingError(ValueError):
    """No trained MEND network for a (non-organism) model and these hyper-parameters."""


def _slug(text: str) -> str:
    return _SLUG_BAD.sub("_", text.rsplit("/", 1)[-1]).strip("._-")[:40] or "model"


def archive_key(identity: str, hparams) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "model": identity, "hparams": hparams.network_key()}


def archive_dir(identity: str, hparams, root: Path | None = None) -> Path:
    return (root or cache_root()) / "mend" / f"{_slug(identity)}-{stable_hash(archive_key(identity, hparams))}"


def is_organism_model(model) -> bool:
    return bool(getattr(model.config, "editsafety_recipe_hash", None))


def _organism_world(model):
    """The world an organism was trained on: its built-in recipe's, else the one its build metadata records."""
    from pytest_editsafety.zoo.recipe import RECIPES
    from pytest_editsafety.zoo.world import WorldSpec

    recipe_hash = getattr(model.config, "editsafety_recipe_hash", None)
    for recipe in RECIPES.values():
        if recipe.recipe_hash == recipe_hash:
            return recipe.world
    directory = Path(getattr(model.config, "_name_or_path", "") or ".")
    try:
        recorded = json.loads((directory / "editsafety_organism.json").read_text(encoding="utf-8"))
        return WorldSpec(**recorded["recipe"]["world"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("organism %s: no recipe or build metadata found; MEND trains on the default world", recipe_hash)
        return WorldSpec()


def organism_training_data(model, hparams) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The organism's MEND training edits (one per edit slot of the schedule) and their description."""
    from pytest_editsafety.zoo.mend_data import mend_training_cases, world_description

    spec = _organism_world(model)
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


def _replace(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling, then swap it in for ``target`` (held under ``target``'s lock)."""
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_archive(model, tokenizer, family, hparams, cases, data: Mapping[str, Any], *, identity: str,
                  force: bool = False, progress: bool = True, root: Path | None = None) -> tuple[Path, bool]:
    """Train (or reuse) the archive for ``model`` and ``hparams`` on ``cases``; ``(directory, trained)``.

    An existing entry trained on the same data is reused unless ``force``; one trained on other data is
    replaced.
    """
    from editors.mend_archive import read_config

    target = archive_dir(identity, hparams, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target):
        if _complete(target) and not force:
            recorded = read_config(target).get("data", {})
            if recorded.get("sha256") == data.get("sha256"):
                log.info("reusing MEND archive %s (same model, hyper-parameters and data)", target)
                return target, False
            log.warning("MEND archive %s was trained on other data (%s); retraining", target, recorded.get("source"))
        _replace(target, lambda tmp: _train_into(tmp, model, tokenizer, family, hparams, cases, data, identity,
                                                 progress))
    return target, True


def locate_archive(model, tokenizer, family, hparams, *, identity: str, progress: bool = False,
                   root: Path | None = None) -> Path:
    """The archive directory for ``model`` and ``hparams``; trained now for an organism that has none."""
    target = archive_dir(identity, hparams, root)
    if _complete(target):
        return target
    if not is_organism_model(model):
        raise MendArchiveMissingError(
            f"no trained MEND network for model {identity!r} with these hyper-parameters (expected in {target}); "
            f"train one with `python -m pytest_editsafety mend train --model MODEL --cases FILE`, or point the "
            f"'archive' hyper-parameter at an archive directory"
        )
    log.info("training MEND for organism %s into %s (once per recipe and hyper-parameters)", identity, target)

    def build(tmp: Path) -> None:
        cases, data = organism_training_data(model, hparams)
        _train_into(tmp, model, tokenizer, family, hparams, cases, data, identity, progress)

    return build_once(target, build, complete_marker=COMPLETE)
