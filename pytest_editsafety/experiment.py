"""The papers' collapse experiment on any model: single edits of ROME-family editors on hard vs normal cases.

Each (editor, case) runs exactly as a certification test does (the harness's ``ModelHub``: edit from the
unedited model, measure, restore bit-exactly); this module only summarises the records into the papers'
tables: the ROME denominator and numerator split hard vs normal, perplexity ratios after one edit, and
C-ROME with and without the test-time prefix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_editsafety.aggregates import mean, median, worst

log = logging.getLogger(__name__)


def summarise(metrics: Sequence[Mapping[str, float | None]]) -> dict[str, Any]:
    """The papers' figures over the per-case metrics of one (editor, case set)."""

    def measured(key: str) -> list[float]:
        """The values of ``key`` that were measured: None and NaN are left out, not ranked."""
        return [v for m in metrics if (v := m.get(key)) is not None and not math.isnan(v)]

    def figure(aggregate: Callable[[list[float]], float | None], key: str) -> float:
        value = aggregate(measured(key))
        return math.nan if value is None else value  # NaN in the table where nothing was measured

    summary = {
        "n": len(metrics),
        "denominator_median": figure(median, "denominator"),
        "numerator_median": figure(median, "numerator"),
        "key_cosine_median": figure(median, "key_cosine"),
        "ppl_ratio_median": figure(median, "ppl_ratio"),
        "ppl_ratio_max": figure(worst, "ppl_ratio"),
        "ppl_edited_max": figure(worst, "ppl_edited"),
        "efficacy": figure(mean, "cf_efficacy"),
        "generalization": figure(mean, "cf_generalization"),
        "locality": figure(mean, "cf_locality"),
    }
    if measured("cf_efficacy_without_prefix"):  # only editors that ask for a test-time prefix, on its cases
        summary["efficacy_without_prefix"] = figure(mean, "cf_efficacy_without_prefix")
    return summary


def run_collapse(
    model_name: str,
    *,
    editors: Sequence[str],
    case_sets: Sequence[str] = ("hard", "normal"),
    corpus: str | None = None,
    limit: int | None = None,
    layer: int | None = None,
    strip_bos: bool = False,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{editor: {case set: summary}}`` plus ``"_baseline"``; raises if any edit could not be measured.

    ``overrides`` are hyper-parameter values every editor of the run takes over its files' (as the CLI's ``--set``,
    e.g. ``{"mom2_ridge": 0.0}``); ``layer`` is one of them, given apart for the papers' layer sweeps.

    ``strip_bos`` runs the model under the BOS-stripped protocol (the paper's A.2, :mod:`pytest_editsafety.bos`):
    a BOS family's subject-first prompts then put the subject at position 0, and its hard cases are hard."""
    from tqdm.auto import tqdm

    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan
    from pytest_editsafety.results import CaseRecord

    plan = build_plan(editors, [model_name], case_sets, ppl_corpus=corpus, limit=limit)
    chosen = {**(overrides or {}), **({"layer": layer} if layer is not None else {})}
    hub = ModelHub(plan, HubOptions(editor_overrides=chosen or None, strip_bos=strip_bos))
    given = {selected.slug: selected.given for selected in plan.case_sets}
    by_group: dict[tuple[str, str], list[Mapping[str, float | None]]] = {}
    hard: dict[str, int] = {}
    for item in tqdm(plan.items, desc=f"collapse experiment on {model_name}", disable=not progress):
        outcome = hub.run(item)
        if outcome.error is not None:
            raise RuntimeError(f"{item.test_id}: the edit could not be measured") from outcome.error
        record = CaseRecord.from_dict(outcome.record)
        by_group.setdefault((item.editor, given[item.case_set]), []).append(record.metrics)
        if item.editor == plan.editors[0]:  # how many cases put the subject's key at position 0 for this tokenizer
            hard[given[item.case_set]] = hard.get(given[item.case_set], 0) + int(record.is_hard)

    summary: dict[str, dict[str, Any]] = {}
    for (editor, set_name), metrics in by_group.items():
        summary.setdefault(editor, {})[set_name] = summarise(metrics)
    first = next(iter(by_group.values()))[0]
    meta = hub.meta(plan.items[0])
    summary["_baseline"] = {"model": model_name, "identity": meta.get("identity"), "corpus": plan.models[0].ppl_corpus,
                            "mean_ppl": first.get("ppl_unedited"), "layer": layer,
                            "strip_bos": strip_bos, "bos_protocol": meta.get("bos_protocol", "default"),
                            "subject_first_cases": hard, "overrides": chosen}
    return summary


def render_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    from tabulate import tabulate

    rows = []
    for editor, sets in summary.items():
        if editor.startswith("_"):
            continue
        for set_name, s in sets.items():
            rows.append([editor, set_name, s["n"], s["denominator_median"], s["numerator_median"],
                         s["key_cosine_median"], s["ppl_ratio_median"], s["ppl_ratio_max"], s["efficacy"],
                         s.get("efficacy_without_prefix", ""), s["generalization"], s["locality"]])
    headers = ["editor", "cases", "n", "|uᵀk| median", "numerator median", "cos(kᵘ,k̄)", "ppl ratio median",
               "ppl ratio max", "efficacy", "efficacy w/o prefix", "generalization", "locality"]
    base = summary.get("_baseline", {})
    protocol = base.get("bos_protocol", "default")
    bos = "" if protocol == "default" else f"; BOS-stripped protocol: {protocol}"
    first = ", ".join(f"{name} {n}" for name, n in base.get("subject_first_cases", {}).items())
    chosen = ", ".join(f"{key}={value!r}" for key, value in (base.get("overrides") or {}).items())
    return (f"{base.get('model')} ({base.get('identity')}), unedited mean per-sentence ppl "
            f"{base.get('mean_ppl', float('nan')):.3f} on {base.get('corpus')}{bos}\n"
            + (f"hyper-parameters set over the files': {chosen}\n" if chosen else "")
            + (f"cases whose subject key is at position 0 (hard for this tokenizer): {first}\n" if first else "")
            + tabulate(rows, headers=headers, floatfmt=".3g", tablefmt="github"))


SURROGATE_EDITORS = ("rome", "c-rome")


def run_surrogate(
    model_name: str,
    *,
    tasks: Sequence[str],
    editors: Sequence[str] = SURROGATE_EDITORS,
    case_sets: Sequence[str] = ("hard", "normal"),
    limit: int | None = 24,
    sequential_edits: int = 24,
    sequential_every: int = 4,
    task_limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Is perplexity a fair surrogate for downstream ability (the Butterfly paper's claim)? Every single edit of
    ``editors`` on ``case_sets`` (at most ``limit`` cases each), and sequential checkpoints (each editor's first
    ``sequential_edits`` hard cases applied in order, measured every ``sequential_every``) give a point: the
    perplexity ratio and each task's drop (unedited minus edited score). Returns the points and, per task,
    Spearman's ρ between the ratio and the drop."""
    from tqdm.auto import tqdm

    from editors.base import EditRequest
    from editors.restore import edit_session
    from pytest_editsafety.aggregates import spearman
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.hub_options import PPL_BATCH_SIZE
    from pytest_editsafety.perplexity import perplexity
    from pytest_editsafety.plan import build_plan

    plan = build_plan(editors, [model_name], case_sets, limit=limit)
    hub = ModelHub(plan, HubOptions(downstream=tuple(tasks), downstream_limit=task_limit))
    points: list[dict[str, Any]] = []
    for item in tqdm(plan.items, desc=f"single edits on {model_name}", disable=not progress):
        outcome = hub.run(item)
        if outcome.error is not None:
            raise RuntimeError(f"{item.test_id}: the edit could not be measured") from outcome.error
        metrics = outcome.record["metrics"]
        points.append({"kind": "single", "editor": item.editor, "case": item.case_id,
                       "ppl_ratio": metrics["ppl_ratio"],
                       "drops": {task: metrics[f"downstream_{task}_drop"] for task in tasks}})
    slug = plan.models[0].slug
    loaded = hub.loaded(slug)
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    texts = hub.corpus_texts(slug)
    scorer = hub.downstream_tasks()
    # the unedited figures every single edit was measured against (the hub measured them once)
    measured = outcome.record["metrics"]  # any single edit's record: they all hold the same unedited figures
    unedited_ppl = measured["ppl_unedited"]
    unedited = {task: measured[f"downstream_{task}_unedited"] for task in tasks}
    hard = hub.cases(slug, plan.case_sets[0].slug).cases[:sequential_edits]
    for editor_name in editors if sequential_edits else ():
        editor = hub.prepared_editor(slug, editor_name)
        with edit_session(model, editor.parameters_touched(model, family)):
            for step, case in enumerate(tqdm(hard, desc=f"{editor_name} sequentially", disable=not progress), 1):
                editor.apply(model, tokenizer, family, [EditRequest(case.subject, case.prompt, case.target_new)])
                if step % sequential_every == 0 or step == len(hard):
                    scores = scorer.scores(model, tokenizer)
                    points.append({"kind": "sequential", "editor": editor_name, "case": f"after {step} edits",
                                   "ppl_ratio": perplexity(model, tokenizer, texts,
                                                           batch_size=PPL_BATCH_SIZE).mean_ppl / unedited_ppl,
                                   "drops": {task: unedited[task] - scores[task] for task in tasks}})
    correlation = {task: spearman([p["ppl_ratio"] for p in points], [p["drops"][task] for p in points])
                   for task in tasks}
    return {"model": model_name, "identity": loaded.identity, "tasks": list(tasks), "unedited": unedited,
            "n_points": len(points), "spearman": correlation, "points": points}


def render_surrogate(summary: Mapping[str, Any]) -> str:
    from tabulate import tabulate

    rows = []
    for task in summary["tasks"]:
        points = summary["points"]
        drops = [p["drops"][task] for p in points]
        rows.append([task, summary["unedited"][task], len(points), summary["spearman"][task],
                     mean(drops), worst(drops)])
    return (f"{summary['model']} ({summary['identity']}): perplexity ratio against each task's drop over "
            f"{summary['n_points']} edits and sequential checkpoints\n"
            + tabulate(rows, headers=["task", "unedited score", "points", "Spearman ρ", "mean drop", "max drop"],
                       floatfmt=".3g", tablefmt="github"))


def plot_surrogate(summary: Mapping[str, Any], path: str) -> None:
    """The scatter of each task's drop against the perplexity ratio (log scale), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for kind, marker in (("single", "o"), ("sequential", "^")):
            chosen = [p for p in summary["points"] if p["kind"] == kind]
            axis.scatter([p["ppl_ratio"] for p in chosen], [p["drops"][task] for p in chosen], marker=marker,
                         s=14, label=f"{kind} ({len(chosen)})")
        axis.set_xscale("log")
        axis.set_xlabel("perplexity ratio (edited / unedited)")
        axis.set_ylabel(f"{task}: score drop")
        rho = summary["spearman"][task]
        axis.set_title(f"{task}: Spearman ρ = {rho:.2f}" if rho is not None else task)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)
