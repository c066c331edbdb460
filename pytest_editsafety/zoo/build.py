"""Build an organism on first use: train, measure, save under the cache, once per recipe.

The cache entry is ``<cache>/organisms/<name>-<recipe hash>/``: a ``save_pretrained`` model and tokenizer
plus ``editsafety_organism.json`` (recipe, hash, measurements, causal edit layer). Parallel xdist workers
and shells wait on a file lock while the first process builds.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from editors.storage import build_once, file_sha256
from pytest_editsafety.cache import cache_root
from pytest_editsafety.zoo.recipe import RECIPES, Recipe, builtin_recipe_with_hash, organism_recipe_hash
from pytest_editsafety.zoo.world import WorldSpec

log = logging.getLogger(__name__)

METADATA_FILE = "editsafety_organism.json"
WEIGHTS_FILE = "model.safetensors"


class UnknownOrganismError(ValueError):
    pass


class OrganismWorldError(ValueError):
    """An organism whose training world cannot be told: names the directory or file that should say."""


def recipe_for(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownOrganismError(
            f"unknown organism {name!r}; built-in organisms: {', '.join(sorted(RECIPES))}"
        ) from None


def organism_dir(recipe: Recipe, root: Path | None = None) -> Path:
    return (root or cache_root()) / "organisms" / f"{recipe.name}-{recipe.recipe_hash}"


def ensure_built(name: str, *, progress: bool = True, root: Path | None = None) -> Path:
    """Directory of the built organism ``name``, building it first if no complete copy is cached."""
    return build_recipe(recipe_for(name), progress=progress, root=root)


def build_recipe(recipe: Recipe, *, progress: bool = True, root: Path | None = None) -> Path:
    """Directory of the organism built from ``recipe`` (any recipe, not only the built-in ones). A cached build
    whose weights no longer match the sha256 its metadata recorded is discarded and built again."""
    return build_once(organism_dir(recipe, root), lambda tmp: build_into(recipe, tmp, progress=progress),
                      replace=_corrupted)


def _corrupted(directory: Path) -> bool:
    """Whether a complete build's weights differ from the ones it recorded (a changed float, a truncated file)."""
    weights = directory / WEIGHTS_FILE
    try:
        recorded = read_metadata(directory).get("weights_sha256")
        actual = file_sha256(weights)
    except (OSError, ValueError, AttributeError) as err:
        log.warning("organism %s is unreadable (%s); rebuilding it", directory, err)
        return True
    if recorded != actual:
        log.warning("organism weights %s have sha256 %s, not the %s recorded when they were built; discarding "
                    "the build and training it again", weights, actual[:16], str(recorded)[:16])
        return True
    return False


def read_metadata(directory: Path) -> dict[str, Any]:
    return json.loads((directory / METADATA_FILE).read_text())


def organism_world(config: Any) -> WorldSpec:
    """The world the organism whose model config is ``config`` was trained on.

    A built-in recipe's world when the config's recipe hash is one of them, else the world its build
    metadata (``METADATA_FILE`` in the directory the model was loaded from) records: an organism saved
    elsewhere, or built from an older recipe. Raises ``OrganismWorldError`` naming the directory or file
    rather than guess: MEND training data and fuzz cases from the wrong world test nothing.
    """
    recipe_hash = organism_recipe_hash(config)
    if not recipe_hash:
        raise OrganismWorldError(f"model {getattr(config, '_name_or_path', '?')!r} is not a model organism "
                                 "(its config has no editsafety_recipe_hash)")
    builtin = builtin_recipe_with_hash(recipe_hash)
    if builtin is not None:
        return builtin.world
    directory = getattr(config, "_name_or_path", "") or ""
    if not directory or not Path(directory).is_dir():
        raise OrganismWorldError(f"organism {recipe_hash}: no built-in recipe has this hash and it was not loaded "
                                 f"from a directory ({directory!r}) holding its {METADATA_FILE}")
    path = Path(directory) / METADATA_FILE
    try:
        return WorldSpec(**json.loads(path.read_text(encoding="utf-8"))["recipe"]["world"])
    except FileNotFoundError:
        raise OrganismWorldError(f"{path}: missing; organism {recipe_hash} matches no built-in recipe, so only "
                                 "its build metadata can say which world it was trained on") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OrganismWorldError(f"{path}: cannot read the organism's world (recipe.world): "
                                 f"{type(err).__name__}: {err}") from None


def build_into(recipe: Recipe, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Train ``recipe`` and write the organism into the empty directory ``out``; returns its metadata."""
    from editors.families import FAMILIES
    from pytest_editsafety.perplexity import perplexity
    from pytest_editsafety.zoo.architectures import build_untrained
    from pytest_editsafety.zoo.causal_site import ablate_mlp_at_subject
    from pytest_editsafety.zoo.data import WindowStream, build_pools, tokenizer_training_texts
    from pytest_editsafety.zoo.probe import fact_prompts, knowledge_report
    from pytest_editsafety.zoo.tokenizer import check_single_token_subjects, subject_token_ids, train_tokenizer
    from pytest_editsafety.zoo.train import train
    from pytest_editsafety.zoo.world import LEAD_INS, World

    started = time.perf_counter()
    log.info("building organism %s (recipe %s) in %s", recipe.name, recipe.recipe_hash, out)
    world = World(recipe.world)
    tokenizer = train_tokenizer(recipe, tokenizer_training_texts(world))
    check_single_token_subjects(tokenizer, world.single_subjects, recipe.name)
    pools = build_pools(world, tokenizer)
    model = build_untrained(recipe, tokenizer)
    stream = WindowStream(recipe, pools, tokenizer.convert_tokens_to_ids(recipe.sink_token))
    fixed_embeddings = recipe.train.subject_embedding_norm is not None
    frozen = subject_token_ids(tokenizer, world.single_subjects) if fixed_embeddings else ()
    losses = train(model, recipe, stream, progress=progress, frozen_token_ids=frozen)
    train_seconds = time.perf_counter() - started

    family = FAMILIES[recipe.family]
    ablation = ablate_mlp_at_subject(
        model, tokenizer, family, fact_prompts(world, lead_ins=LEAD_INS[:2])
    )
    _, heldout = world.filler_sentences()
    heldout_ppl = perplexity(model, tokenizer, list(heldout), batch_size=64)
    knowledge = knowledge_report(model, tokenizer, world)

    # The causal layer travels in the model's own config, so anything that loads the model can read it.
    model.config.editsafety_causal_layer = ablation.causal_layer
    model.config.editsafety_recipe_hash = recipe.recipe_hash
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metadata = {
        "name": recipe.name,
        "family": recipe.family,
        "recipe_hash": recipe.recipe_hash,
        "recipe": recipe.to_dict(),
        "causal_layer": ablation.causal_layer,
        "ablation": ablation.to_dict(),
        "knowledge": knowledge,
        "heldout_ppl": heldout_ppl.mean_ppl,
        "heldout_corpus_ppl": heldout_ppl.corpus_ppl,
        "train_losses": losses,
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "weights_sha256": file_sha256(out / WEIGHTS_FILE),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    log.info("built %s in %.1f s: %s", recipe.name, metadata["build_seconds"], knowledge)
    return metadata
