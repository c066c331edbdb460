"""The Python API, for callers that are not at a pytest prompt: a platform that holds a loaded model.

* :func:`certify` runs certification tests exactly as the plugin does (the same plan, hub, bounds and record
  format) and returns a :class:`Certificate` whose JSON is the plugin's ``editsafety.json``.
* :func:`guard` decides, before any weight moves, whether an edit is safe to make, from what the editor can say
  about it without editing (its ``denominator`` report: ROME's ``|uᵀk|`` against a floor derived like the
  certification's); with ``apply=True`` it also makes the edit, measures perplexity on a probe set and rolls the
  edit back, bit-exactly, when a bound breaks. :class:`Guard` is the same judge set up once (the editor, the floor)
  for a platform that asks it about edit after edit. They live in :mod:`pytest_editsafety.guard`.

A model is a name (built-in, Hugging Face id, local directory: loaded as the plugin loads it) or a model object
with its tokenizer; an editor is a registered name or an editor object (:mod:`editors.base`), and :func:`certify`
also takes several (names separated by commas, or a sequence of names and objects); cases are a case set name, a
case file, a ``CaseSet`` or a sequence of ``EditCase`` (:mod:`pytest_editsafety.api_inputs` checks each form).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_editsafety.api_inputs import case_sets, measuring, plan_and_hub
from pytest_editsafety.bounds import Bounds
from pytest_editsafety.guard import GUARD_INTERFERENCE_FACTOR, GUARD_PROBE_TEXTS, Guard, GuardDecision, guard
from pytest_editsafety.model_pool import HeldModelChangedError

log = logging.getLogger(__name__)

__all__ = ["GUARD_INTERFERENCE_FACTOR", "GUARD_PROBE_TEXTS", "Certificate", "Guard", "GuardDecision",
           "HeldModelChangedError", "certify", "guard"]


@dataclass(frozen=True)
class Certificate:
    """What :func:`certify` found: the run's result (``results.RunResult``, the plugin's JSON) and its verdict."""

    result: Any
    certified: bool

    @property
    def coverage(self) -> Any:
        """How much of its plan the run covered (``results.Coverage``: ``status`` ``complete`` or ``partial``, and
        each gap with the reason). A partial run, e.g. under ``limit``, is never certified, whatever its records."""
        return self.result.coverage

    @property
    def cases(self) -> tuple[Any, ...]:
        """Every measured case's record (``results.CaseRecord``): the single edits', or with ``batch_size`` the
        batches' members."""
        return self.result.edited_cases

    @property
    def batches(self) -> tuple[Any, ...]:
        """The batch tests' records (``results.BatchRecord``); empty without ``batch_size``."""
        return self.result.batches

    def to_json(self) -> str:
        from pytest_editsafety.results import to_json

        return to_json(self.result)

    def write(self, json_path: str | Path, md_path: str | Path) -> None:
        """Write the certificate as the plugin does, each file atomically: the JSON and the markdown report.
        Raises ``output_lock.OutputsInUseError`` while a certification run holds either path."""
        from pytest_editsafety.output_lock import holding_outputs
        from pytest_editsafety.report import write_outputs

        with holding_outputs((json_path, md_path), command="pytest_editsafety.certify(...).write"):
            write_outputs(self.result, Path(json_path), Path(md_path))


def certify(model: Any, tokenizer: Any, editor: Any, cases: Any, *,
            bounds: Bounds | Mapping[str, Any] | None = None, corpus: str | None = None, limit: int | None = None,
            sequential: bool = False, hparams: str | Path | Sequence[str | Path] | Mapping[str, Any] | None = None,
            stats_corpus: str | None = None,
            stats_dir: str | None = None, cache_root: str | None = None, dtype: str | None = None,
            strip_bos: bool = False, sequential_edits: int | None = None, sequential_every: int | None = None,
            sequential_corpus: str | None = None, batch_size: int = 1,
            search_batch: int | None = None, downstream: Sequence[str] = (),
            downstream_limit: int | None = None) -> Certificate:
    """Certify ``editor`` on ``model`` over ``cases`` as ``pytest --editor=... --model=... --cases=...`` would.

    ``editor`` is a registered name, an editor object, names separated by commas, or a sequence of names and objects:
    several editors certify in one run, where those that declare the same measurement (ROME and its C-ROME
    variants' v*, MEMIT, EMMET and AlphaEdit's z) search once per case and share it, as in the plugin.
    Every case is edited from the unedited model, measured, restored bit-exactly and judged against ``bounds``
    (default ``Bounds()``, the plugin's defaults). ``hparams`` is a JSON file or named set, a sequence of them
    (layered in order: ``("kmeng01", "my.json")``), or a mapping, layered over the editor's built-in
    hyper-parameters; with several editors, a mapping from editor name to one of those (an editor it does not name
    keeps its built-in ones); ``corpus`` the perplexity corpus (default: the
    model's, as the plugin picks it). ``strip_bos`` runs the papers' BOS-stripped protocol (A.2,
    ``--editsafety-strip-bos``): a tokenizer that prepends BOS runs without it (a copy of a tokenizer given here is
    stripped), recorded in the certificate.
    ``sequential`` adds the papers' sequential run per case set: ``sequential_edits`` edits (default 107 or the
    whole set), measured every ``sequential_every`` edits and after the last, on ``sequential_corpus`` (the
    plugin's ``--editsafety-sequential-*`` options and defaults). ``batch_size`` K > 1 certifies batches, as
    ``--editsafety-batch-size K`` does: the cases K at a time applied in one edit (``Certificate.batches``; the
    members' records in ``Certificate.cases``); the editor must declare it takes K requests at once
    (``max_requests_per_apply``), else every batch records the error. ``search_batch`` N runs the edit searches
    of N single-edit cases at once (``--editsafety-search-batch``; None: 8 on a GPU, 1 on a CPU).
    ``downstream`` names lm-eval tasks scored before and after every single edit, at most ``downstream_limit``
    examples each (``--editsafety-downstream``, :mod:`pytest_editsafety.downstream`). The model is left as it was
    given. A model that cannot be loaded, or an editor that cannot be set up for it (a hyper-parameter unknown, of
    the wrong type or out of range, a missing trained network, statistics too poor to solve with), raises that
    error (an ``editors.hparams.HparamsError`` names the key) before any case runs, whichever of several editors it
    is; errors of a single case are recorded. Set-up is therefore not in any record's ``duration_s``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or an integer >= 1, got {limit!r}")
    from editors.restore import RestoreError
    from pytest_editsafety.controller import RunRecords, absorb_meta, build_result
    from pytest_editsafety.results import Session

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    plan, hub = plan_and_hub(model, tokenizer, editor, case_sets(cases), bounds=bounds, corpus=corpus, limit=limit,
                             sequential=sequential, hparams=hparams, stats_corpus=stats_corpus, stats_dir=stats_dir,
                             cache_root=cache_root, dtype=dtype, strip_bos=strip_bos,
                             sequential_edits=sequential_edits, sequential_every=sequential_every,
                             sequential_corpus=sequential_corpus, batch_size=batch_size, search_batch=search_batch,
                             downstream=downstream, downstream_limit=downstream_limit)
    # every editor set up first, so that a caller hears of a bad setting as an exception naming it, not as an
    # error recorded against every case of an uncertified certificate (the plugin, which must report per test,
    # records it so)
    records = RunRecords(started=started, t0=t0, seen=True, strip_bos=strip_bos)
    # a model you hold is measured as the plugin's own loads are, in eval mode (dropout off), and given back in the
    # modes it came in
    with measuring(model):
        for planned_model in plan.models:
            for name in plan.editors:
                try:
                    hub.prepared_editor(planned_model.slug, name)
                except RestoreError as err:  # an editor's set-up wrote to the model: yours, if you hold it
                    changed = hub.held_model_changed(planned_model.slug)
                    if changed is None:
                        raise
                    raise changed from err
        for item in plan.items:
            outcome = hub.run(item)
            absorb_meta(records, outcome.meta)
            records.records[item.test_id] = outcome.record
            changed = hub.held_model_changed(item.model)
            if changed is not None:  # the caller's object is not what they gave: no certificate can say otherwise
                raise changed
    # one session that selected the whole plan and ran it to the end: the certificate covers its plan or says why not
    session = Session(keyword="", markexpr="", shard=None, deselected=(), interrupted=None)
    result = build_result(plan, hub.options.bounds, records, ("pytest_editsafety.api.certify",), session)
    return Certificate(result=result, certified=result.certified)
