"""Merging shard results (one file per machine or pytest-split group) into one run.

``merge`` joins what it is given into one run with the shards' common plan; whether the shards add up to
that plan is the merged run's ``coverage`` (callers such as ``report`` refuse an incomplete one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pytest_editsafety.results.coverage import RunPlan, describe_plan_difference
from pytest_editsafety.results.errors import ResultsError
from pytest_editsafety.results.records import BOS_NOT_LOADED, BatchRecord, RunMetadata, RunResult

__all__ = ["MergeError", "merge"]


class MergeError(ResultsError):
    """Shards that cannot form one run (other plans, bounds, corpus or model weights, conflicting records)."""


def _what_was_measured(record: Any) -> Any:
    """The record without how long it took and where it ran, which a re-run shard may change (a batch's members
    too)."""
    if isinstance(record, BatchRecord):
        record = dataclasses.replace(record, members=tuple(_what_was_measured(m) for m in record.members))
    return dataclasses.replace(record, duration_s=0.0, worker=None, device=None)


def _merge_bos_protocol(merged: dict[str, str], shard: Mapping[str, str], first_used: bool, name: str,
                        first_name: str) -> None:
    """Fold one shard's BOS-stripped protocol record into ``merged``: every shard must run it or none (a model's
    keys differ between the protocols), and a model the protocol stripped in one shard was stripped in all; a
    shard where the model never loaded ("not loaded") leaves another shard's account standing."""
    if bool(shard) != first_used:
        with_it, without = (name, first_name) if shard else (first_name, name)
        raise MergeError(f"{with_it} ran the BOS-stripped protocol (--editsafety-strip-bos) and {without} did not")
    for model, what in shard.items():
        known = merged.setdefault(model, what)
        if known == BOS_NOT_LOADED:
            merged[model] = what
        elif what not in (known, BOS_NOT_LOADED):
            raise MergeError(f"model {model!r}: the BOS-stripped protocol says {known!r} in one shard but {what!r} in "
                             f"{name}")


def add_sources(known: dict[str, str], more: Mapping[str, str]) -> None:
    """Add ``more`` (a layer or a hyper-parameter -> where it came from, several ``"; "``-separated) to ``known``:
    every distinct source once, in the order first seen, for a run whose workers or shards report the same key
    (C's sources per layer, the files behind each hyper-parameter)."""
    for layer, sources in more.items():
        seen = known[layer].split("; ") if layer in known else []
        known[layer] = "; ".join(seen + [s for s in sources.split("; ") if s not in seen])


def merge(results: Sequence[RunResult], *, sources: Sequence[str] | None = None) -> RunResult:
    """Join shard results into one run.

    Rules: the plan must be the same (its hash), or absent from every shard (files older than v2); bounds
    and corpus must be equal; a model must have one identity and an (editor, model) one hparams hash across
    shards; editors and models are the union (first-seen order); start is the earliest, finish the latest;
    ``duration_s`` is the shards' sum (machine time, not wall time); hardware, differing library versions,
    commands and sessions are kept side by side. A test id in several shards is fine
    when the records agree (a re-run shard) up to duration, worker and device, an error naming the ids otherwise.
    """
    if not results:
        raise MergeError("no results to merge")
    names = list(sources) if sources is not None else [f"shard {i + 1}" for i in range(len(results))]
    if len(names) != len(results):
        raise MergeError(f"{len(results)} results but {len(names)} source names")
    if len(results) == 1:
        return results[0]
    first = results[0].metadata
    plan = _common_plan(results, names)

    models: dict[str, str] = {}
    model_from: dict[str, str] = {}
    hparams: dict[str, dict[str, str]] = {}
    hparams_values: dict[str, dict[str, dict[str, Any]]] = {}
    hparams_sources: dict[str, dict[str, dict[str, str]]] = {}
    second_moments: dict[str, dict[str, str]] = {}
    editors: list[str] = []
    versions: dict[str, list[str]] = {}
    hardware: list[str] = []
    commands: list[str] = []
    bos: dict[str, str] = {}
    for name, result in zip(names, results):
        meta = result.metadata
        _merge_bos_protocol(bos, meta.bos_protocol, bool(first.bos_protocol), name, names[0])
        if meta.bounds != first.bounds:
            diff = sorted(k for k in set(meta.bounds) | set(first.bounds) if meta.bounds.get(k) != first.bounds.get(k))
            details = ", ".join(f"{k}: {first.bounds.get(k)!r} vs {meta.bounds.get(k)!r}" for k in diff)
            raise MergeError(f"{name} was run with other bounds than {names[0]} ({details})")
        if (meta.corpus, meta.corpus_sha256) != (first.corpus, first.corpus_sha256):
            raise MergeError(
                f"{name} measured perplexity on corpus {meta.corpus!r} (sha256 {meta.corpus_sha256[:12]}), "
                f"{names[0]} on {first.corpus!r} (sha256 {first.corpus_sha256[:12]})"
            )
        for model, identity in meta.models.items():
            if models.setdefault(model, identity) != identity:
                raise MergeError(
                    f"model {model!r} is {models[model]!r} in {model_from[model]} but {identity!r} in {name}"
                )
            model_from.setdefault(model, name)
        for editor, per_model in meta.hparams_hashes.items():
            for model, digest in per_model.items():
                known = hparams.setdefault(editor, {}).setdefault(model, digest)
                if known != digest:
                    raise MergeError(f"hparams of {editor!r} on {model!r} differ between shards ({name})")
        for model, layers in meta.second_moments.items():  # shards that used another C at a layer: both named
            add_sources(second_moments.setdefault(model, {}), layers)
        for editor, per_model in meta.hparams.items():  # equal hashes above: equal values
            for model, values in per_model.items():
                hparams_values.setdefault(editor, {}).setdefault(model, values)
        for editor, per_model in meta.hparams_sources.items():  # equal values, maybe from other files: each named
            for model, sources in per_model.items():
                add_sources(hparams_sources.setdefault(editor, {}).setdefault(model, {}), sources)
        editors.extend(e for e in meta.editors if e not in editors)
        for lib, version in meta.library_versions.items():
            seen = versions.setdefault(lib, [])
            if version not in seen:
                seen.append(version)
        if meta.hardware not in hardware:
            hardware.append(meta.hardware)
        commands.extend(meta.commands)

    cases = _merge_records([r.cases for r in results], names)
    sequential = _merge_records([r.sequential for r in results], names)
    batches = _merge_records([r.batches for r in results], names)
    metadata = RunMetadata(
        editors=tuple(editors),
        models=models,
        hparams_hashes=hparams,
        hparams=hparams_values,
        hparams_sources=hparams_sources,
        second_moments=second_moments,
        bounds=first.bounds,
        corpus=first.corpus,
        corpus_sha256=first.corpus_sha256,
        library_versions={lib: " | ".join(vs) for lib, vs in versions.items()},
        hardware="; ".join(hardware),
        started=min((r.metadata for r in results), key=lambda m: m.started_at).started,
        finished=max((r.metadata for r in results), key=lambda m: m.finished_at).finished,
        duration_s=sum(r.metadata.duration_s for r in results),
        commands=tuple(commands),
        bos_protocol=bos,
    )
    sessions = tuple(session for result in results for session in result.sessions)
    return RunResult(metadata, tuple(cases), tuple(sequential), plan, sessions, batches=tuple(batches))


def _common_plan(results: Sequence[RunResult], names: Sequence[str]) -> RunPlan | None:
    first = results[0].plan
    for name, result in zip(names[1:], results[1:]):
        plan = result.plan
        if (plan is None) != (first is None):
            without, other = (name, names[0]) if plan is None else (names[0], name)
            raise MergeError(f"{without} records no plan (a file older than pytest-editsafety/v2) but {other} does: "
                             f"they are not shards of one run")
        if plan is not None and first is not None and plan.plan_hash != first.plan_hash:
            raise MergeError(f"{name} is a shard of another plan than {names[0]} (plan {plan.plan_hash[:12]} vs "
                             f"{first.plan_hash[:12]}: {describe_plan_difference(first, plan)})")
    return first


def _merge_records(groups: Sequence[Iterable[Any]], names: Sequence[str]) -> list[Any]:
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    conflicts: list[str] = []
    for name, records in zip(names, groups):
        for record in records:
            known = merged.get(record.test_id)
            if known is None:
                merged[record.test_id] = record
                origin[record.test_id] = name
            elif _what_was_measured(known) != _what_was_measured(record):
                conflicts.append(f"{record.test_id} ({origin[record.test_id]} vs {name})")
    if conflicts:
        shown = ", ".join(conflicts[:10]) + (f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else "")
        raise MergeError(f"conflicting records for the same test id: {shown}")
    return list(merged.values())

