"""What editors measure on the unedited model before an edit (their ``prepare()``: ROME's v*, MEMIT's z), for the
hub: in one search batch with the next cases of the run (``--editsafety-search-batch``), or taken from an earlier
editor of the run that declared the same measurement (:mod:`pytest_editsafety.shared_measurements`).

Both rest on what the hub guarantees between tests: every edit is restored and the whole model checked, so the
model a value was measured on is the one the next case edits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from pytest_editsafety.cases import CaseSet
from pytest_editsafety.context_fit import CaseTooLongError, check_fits_context
from pytest_editsafety.model_pool import ModelState, empty_cuda_cache
from pytest_editsafety.plan import Plan, PlanItem

log = logging.getLogger(__name__)

__all__ = ["CPU_SEARCH_BATCH", "GPU_SEARCH_BATCH", "Preparations", "default_search_batch"]

# search batch sizes by device: a GPU runs a batch of searches in little more than the time of one (a small batch
# leaves it idle; 8 cases of 22 prompts keep a 7B model's activations within a few GB); on a CPU, which one case
# keeps busy already, 8 cases together saved about a seventh of the search: too little to measure cases that another
# xdist worker may take
GPU_SEARCH_BATCH = 8
CPU_SEARCH_BATCH = 1


def default_search_batch(device: str | None) -> int:
    """Cases whose searches run together when --editsafety-search-batch is not given, on ``device``."""
    return GPU_SEARCH_BATCH if device is not None and device.startswith("cuda") else CPU_SEARCH_BATCH


def _request(case: Any) -> Any:
    from editors.base import EditRequest

    return EditRequest(case.subject, case.prompt, case.target_new)


class Preparations:
    """The prepared values of one hub's run: ``run_order`` holds the test ids the run selected, in the order it runs
    them, from which a search batch takes the cases after the one under way; ``search_batch`` the batch size (None:
    :func:`default_search_batch` for the model's device); ``share`` whether editors that declare the same
    measurement share it."""

    def __init__(self, plan: Plan, run_order: Sequence[str], *, search_batch: int | None, share: bool) -> None:
        self.plan = plan
        self.search_batch = search_batch
        self.share = share
        self._run_order = tuple(run_order)
        self._run_position = {test_id: index for index, test_id in enumerate(self._run_order)}

    def for_item(self, state: ModelState, item: PlanItem, editor: Any,
                 case_set: Callable[[], CaseSet]) -> Mapping[Any, Any]:
        """What the editor's prepare() measured for ``item``'s case on the unedited model (``{request: value}``),
        ``case_set()`` its case set, hardness tagged: another editor's value where both declare the same measurement, else measured now,
        with the searches of the next ``search_batch - 1`` selected cases of this (editor, model, case set) when
        the batch is above 1. Empty when the editor prepares nothing, and for a case the run did not select (the
        fuzzer's generated cases, measured alone)."""
        from editors.base import prepare_requests

        if item.test_id not in self._run_position:
            return {}
        tagged = case_set()
        key = (item.editor, item.case_set, item.case_id)
        request = _request(tagged.by_id(item.case_id))
        shared_key = self._shared_key(state, editor, request)
        if shared_key is not None and shared_key in state.shared:
            state.prepared.pop(key, None)
            log.debug("%s: measurement taken from the store", item.test_id)
            return {request: state.shared.get(shared_key)}
        size = self.search_batch or default_search_batch(state.device)
        if key not in state.prepared and size > 1 and item.editor not in state.unbatched:
            self._batch(state, item, editor, tagged, size)
        entry = state.prepared.pop(key, {})
        if shared_key is not None:
            if request not in entry:  # measured alone, here, so that the editors after this one find it
                loaded = state.loaded
                entry = dict(prepare_requests(editor, loaded.model, loaded.tokenizer, loaded.family, [request]))
            if request in entry:
                state.shared.put(shared_key, entry[request])
        return entry

    def _shared_key(self, state: ModelState, editor: Any, request: Any) -> Hashable | None:
        """The editor's measurement key for ``request`` when measurements are shared, else None; makes the
        model's store on first use."""
        from editors.base import measurement_key
        from pytest_editsafety.shared_measurements import SharedMeasurements

        if not self.share:
            return None
        key = measurement_key(editor, request)
        if key is None:
            return None
        try:
            hash(key)
        except TypeError as err:
            log.warning("editor %r: its measurement key cannot be a dict key (%s); measuring alone",
                        getattr(editor, "name", editor), err)
            return None
        if state.shared is None:
            state.shared = SharedMeasurements()
        return key

    def _batch(self, state: ModelState, item: PlanItem, editor: Any, tagged: CaseSet, size: int) -> None:
        """The searches of ``item``'s case and of the next ``size - 1`` selected cases of its (editor, model, case
        set) that no earlier editor measured, in one batch, into ``state.prepared`` (and the shared store)."""
        from editors.base import prepare_requests

        loaded = state.loaded
        templates = state.provided[item.editor].context_templates or ("{}",)
        members: list[tuple[PlanItem, Any, Hashable | None]] = []
        for member in [item] + self.next_cases(state, item, size - 1):
            case = tagged.by_id(member.case_id)
            try:
                check_fits_context(loaded, case, templates)
            except CaseTooLongError:  # that case's own test says so; the batch goes on without it
                continue
            request = _request(case)
            shared_key = self._shared_key(state, editor, request)
            if member is not item and shared_key is not None and shared_key in state.shared:
                continue  # an earlier editor measured it; the case takes it from the store when it runs
            members.append((member, request, shared_key))
        try:
            measured = prepare_requests(editor, loaded.model, loaded.tokenizer, loaded.family,
                                        [request for _, request, _ in members])
        except Exception as err:  # each case then runs alone and meets its own error, if it has one
            out_of_memory = type(err).__name__ == "OutOfMemoryError"  # torch.cuda's, without importing torch
            log.warning("%s: the search batch of %d cases failed (%s: %s); measuring %s alone", item.test_id,
                        len(members), type(err).__name__, err,
                        f"every case of {item.editor} on this model" if out_of_memory else "them")
            if out_of_memory:  # the next batch would not fit either; the perplexity's replay gives its memory back
                state.unbatched.add(item.editor)
                state.lower_blocks = None
            measured = {}
            empty_cuda_cache()  # a batch too large for the GPU leaves its blocks cached
        for member, request, shared_key in members:
            # a member the batch did not measure is measured alone when it runs (an empty entry: not batched
            # again, so one odd case does not fail every batch it would join)
            entry = {request: measured[request]} if request in measured else {}
            state.prepared[(member.editor, member.case_set, member.case_id)] = entry
            if shared_key is not None and request in measured:
                state.shared.put(shared_key, measured[request])

    def next_cases(self, state: ModelState, item: PlanItem, count: int) -> list[PlanItem]:
        """Up to ``count`` single-edit items of ``item``'s (editor, model, case set) that this run selected after
        it and whose searches were not run yet."""
        upcoming: list[PlanItem] = []
        position = self._run_position.get(item.test_id)
        if position is None or count < 1:
            return upcoming
        for test_id in self._run_order[position + 1:]:
            other = self.plan.item(test_id)
            if other is None or other.kind != "case":
                continue
            if (other.model, other.case_set) != (item.model, item.case_set):
                break  # the plan runs a (model, case set) in one stretch, its cases' editors interleaved
            if other.editor != item.editor:
                continue
            if (other.editor, other.case_set, other.case_id) not in state.prepared:
                upcoming.append(other)
                if len(upcoming) == count:
                    break
        return upcoming
