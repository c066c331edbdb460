"""Downstream tasks about the organisms' world, as lm-evaluation-harness task configs over local data.

The papers measure what an edit breaks elsewhere with downstream tasks (PIQA, LAMBADA, ...), which the organisms
cannot read. These two ask about the organisms' own world instead, on facts no built-in case edits, so a task
measures damage, not the intended change:

* ``organism_mc``: multiple choice. A fact's prompt ("Fimeth lives in") and four objects of its relation (the
  true one and three others); accuracy is the share where the true object is the likeliest.
* ``organism_cloze``: the last word, as LAMBADA. A fact in another of its relation's phrasings, scored on whether
  greedy decoding gives the object (lm-eval's loglikelihood ``acc``).

The data and configs are written under a directory (the cache), named by the world they come from; lm-eval reads
them with its ``json`` dataset builder, offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from editors.storage import atomic_write_text, build_lock, stable_hash
from pytest_editsafety.zoo.cases import certified_pairs
from pytest_editsafety.zoo.world import World, WorldSpec, render_fact

ORGANISM_TASKS = ("organism_mc", "organism_cloze")
QUESTIONS_PER_TASK = 200
CHOICES = 4
# bump when the data or the configs change: the directory is named by it
TASKS_FORMAT = "pytest-editsafety/organism-tasks/2"


def _facts(world: World, seed: str) -> list:
    edited = certified_pairs(world.spec)
    candidates = [fact for fact in world.facts if (fact.subject, fact.relation) not in edited]
    return random.Random(seed).sample(candidates, QUESTIONS_PER_TASK)


def _multiple_choice(world: World) -> list[dict]:
    rng = random.Random(f"editsafety-mc-{world.spec.seed}")
    rows = []
    for fact in _facts(world, f"editsafety-mc-facts-{world.spec.seed}"):
        relation = world.relations[fact.relation]
        others = rng.sample([o for o in relation.objects if o != fact.object], CHOICES - 1)
        choices = [fact.object, *others]
        rng.shuffle(choices)
        rows.append({"query": render_fact(fact.subject, relation.templates[0], None),
                     "choices": [f" {c}" for c in choices], "gold": choices.index(fact.object),
                     "subject": fact.subject, "relation": fact.relation})
    return rows


def _cloze(world: World) -> list[dict]:
    return [{"context": render_fact(fact.subject, world.relations[fact.relation].templates[1], None),
             "target": f" {fact.object}", "subject": fact.subject, "relation": fact.relation}
            for fact in _facts(world, f"editsafety-cloze-facts-{world.spec.seed}")]


def _config(task: str, data: Path, body: dict) -> str:
    config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **body,
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    # YAML is a superset of JSON: lm-eval reads the config as YAML
    return json.dumps(config, indent=1)


def write_organism_tasks(root: Path, spec: WorldSpec | None = None) -> Path:
    """The directory holding both tasks' data and configs for ``spec``'s world (written once, atomically)."""
    world = World(spec or WorldSpec())
    directory = root / f"organism-{stable_hash({'format': TASKS_FORMAT, 'world': repr(world.spec)})}"
    done = directory / "COMPLETE"
    if done.exists():
        return directory
    with build_lock(directory):
        if done.exists():
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        for task, rows, body in (
            ("organism_mc", _multiple_choice(world), {
                "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "gold", "target_delimiter": ""}),
            ("organism_cloze", _cloze(world), {
                "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
                "target_delimiter": ""}),
        ):
            data = directory / f"{task}.jsonl"
            atomic_write_text(data, "".join(json.dumps(row) + "\n" for row in rows))
            atomic_write_text(directory / f"{task}.yaml", _config(task, data, body))
        atomic_write_text(done, TASKS_FORMAT + "\n")
    return directory
