"""The models a hub holds: loaded once per worker, released least recently used, fingerprinted for the
restore check, and remembered when they fail to load.

:class:`ModelPool` is the model half of :class:`pytest_editsafety.hub.ModelHub`: everything about having a model
in memory (loading it, or taking the one a caller holds; the device it is on; the fingerprint every test's
restore is checked against; releasing it), none of how a test runs on it.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_editsafety.cases import CaseSet
from pytest_editsafety.devices import device_label
from pytest_editsafety.plan import Plan

log = logging.getLogger(__name__)

__all__ = ["HeldModelChangedError", "ModelPool", "ModelState", "default_device", "empty_cuda_cache"]


@dataclass
class ModelState:
    """Everything cached for one model in this worker; the heavy parts go when the model is evicted."""

    slug: str
    loaded: Any = None
    # where the model was last loaded (torch's name, "cuda:0"); kept after an eviction for the records
    device: str | None = None
    # a load that failed: raised again for every later test of the model rather than retried, since a load
    # can take minutes and fail the same way (frames cleared: they would pin a half-loaded model's memory)
    load_error: tuple[BaseException, Any] | None = None
    # every tensor of the model as loaded (editors.fingerprint.ModelFingerprint; None with the check off)
    reference: Any = None
    baseline: dict[str, float] | None = None
    # the downstream tasks' scores on the unedited model (HubOptions.downstream), by task
    downstream_unedited: dict[str, float] | None = None
    corpus: Any = None
    # the unedited perplexity on other corpora than ``corpus`` (sequential runs' ME-PPL_1k), by the name the plan gives
    other_baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    # each perplexity corpus's ids under this model's tokenizer (perplexity.encode), by the corpus's sha256: a
    # certification measures one corpus after every edit, and tokenizing it cost a tenth of the measurement
    encoded_corpora: dict[str, list[list[int]]] = field(default_factory=dict)
    identity: str = ""
    # under the BOS-stripped protocol, what it did to this model (bos.STRIPPED or bos.NOTHING_TO_STRIP); "" without it
    bos_protocol: str = ""
    # what editors' needs are met with (C, templates, trained networks), while the model is loaded
    resources: Any = None
    editors: dict[str, Any] = field(default_factory=dict)
    # what each editor was given at set-up (editors.base.Provided), for cache keys that depend on it
    provided: dict[str, Any] = field(default_factory=dict)
    # editors whose set-up failed (a MEND archive missing, a bad hparams file): raised again for every later
    # test rather than retried, since set-up can train or compute statistics for minutes and fail the same way
    editor_errors: dict[str, tuple[BaseException, Any]] = field(default_factory=dict)
    hparams_hashes: dict[str, str | None] = field(default_factory=dict)
    # each editor's hyper-parameters as plain JSON values (those with a hash), for the certificate
    hparams_values: dict[str, dict[str, Any]] = field(default_factory=dict)
    # each editor's hyper-parameter -> the file (or "overrides") that set it, for the certificate
    hparams_sources: dict[str, dict[str, str]] = field(default_factory=dict)
    tagged: dict[str, CaseSet] = field(default_factory=dict)
    probes: dict[tuple[str, str], Any] = field(default_factory=dict)
    # (editor, case set, case id) -> what the editor's prepare() measured for that case on the unedited model,
    # with the cases searched in one batch (HubOptions.search_batch); taken when the case runs, gone on eviction
    prepared: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    # what editors that declare the same measurement share (HubOptions.share_measurements); gone on eviction
    shared: Any = None
    # the first blocks' outputs over perplexity corpora, replayed after edits above them
    # (pytest_editsafety.lower_blocks.LowerBlockStore; HubOptions.ppl_skip_unedited_blocks); gone on eviction
    lower_blocks: Any = None
    # editors whose search batch failed (a GPU out of memory): their cases are measured alone from then on
    unbatched: set[str] = field(default_factory=set)
    # per editor: the medians of its denominator report over the normal reference cases (pytest_editsafety.floor)
    reference_medians: dict[str, dict[str, float | None] | None] = field(default_factory=dict)


class HeldModelChangedError(RuntimeError):
    """A model object the caller holds was changed by an edit that could not be undone (a failed restore, a write
    outside the editor's declared parameters)."""


class ModelPool:
    """Models by plan slug, at most ``options.max_loaded_models`` loaded at once (least recently used released
    first); what was measured on a released model stays in its state, since it is a pure function of the
    weights. ``held`` maps a slug to a model the caller holds (``registry.LoadedModel``): used as it is, never
    loaded or released; after an edit that could not be undone its later tests fail at once."""

    def __init__(self, plan: Plan, options: Any, root: Path, held: Mapping[str, Any] | None = None) -> None:
        self.plan = plan
        self.options = options
        self._root = root
        self._held_models = dict(held or {})
        self._states: dict[str, ModelState] = {}
        # slugs of the loaded models, least recently used first
        self._lru: list[str] = []

    def _state(self, slug: str) -> ModelState:
        state = self._states.setdefault(slug, ModelState(slug))
        if state.load_error is not None:
            error, tb = state.load_error
            raise error.with_traceback(tb)  # the load's own traceback, not one grown by every test
        if state.loaded is None:
            # free the least recently used models first: two large models rarely fit one GPU
            while len(self._lru) >= max(1, self.options.max_loaded_models):
                self._evict(self._lru[0])
            try:
                self._load(state)
            except Exception as err:
                log.warning("model %s could not be loaded; its remaining tests on this worker report the same "
                            "error", slug)
                _clear_frames(err)
                state.load_error = (err, err.__traceback__)
                empty_cuda_cache()
                raise
        if slug in self._lru:
            self._lru.remove(slug)
        self._lru.append(slug)
        return state

    def _load(self, state: ModelState) -> None:
        """Load model ``state.slug`` into ``state``, which is left as it was if anything fails."""
        from pytest_editsafety.registry import LoadOptions, load_model

        slug = state.slug
        held = self._held_models.get(slug)
        if held is not None:
            state.loaded = held
            state.device = str(next(held.model.parameters()).device)
            state.identity = held.identity
            state.bos_protocol = self._bos_protocol(held)
            state.reference = self._fingerprint(slug, held.model)
            return
        choice = self.plan.model(slug)
        options = LoadOptions(dtype=self.options.dtype, device_map=self.options.device_map,
                              cache_root=str(self._root), strip_bos=self.options.strip_bos)
        log.info("loading model %s (%s)", slug, choice.given)
        loaded = load_model(choice.spec, options)
        device = default_device()
        if self.options.device_map is None:
            loaded.model.to(device)
        else:
            device = str(next(loaded.model.parameters()).device)
        reference = self._fingerprint(slug, loaded.model)
        state.loaded = loaded
        state.device = device
        state.identity = loaded.identity
        state.bos_protocol = self._bos_protocol(loaded)
        state.reference = reference

    def _bos_protocol(self, loaded: Any) -> str:
        """What the BOS-stripped protocol did to ``loaded`` (a model the caller holds was stripped by the API
        before it reached the pool), "" when the run does not use it."""
        if not self.options.strip_bos:
            return ""
        from pytest_editsafety.bos import NOTHING_TO_STRIP, OPTION, STRIPPED
        from pytest_editsafety.cases.classify import default_prepends_bos

        if loaded.bos_stripped:
            return STRIPPED
        if default_prepends_bos(loaded.tokenizer):  # a held model handed over unstripped: the record would lie
            raise ValueError(f"{OPTION}: model {loaded.spec.name}: its tokenizer still prepends BOS; strip it "
                             "(pytest_editsafety.bos.strip_bos) before handing the model to the hub")
        return NOTHING_TO_STRIP

    def _fingerprint(self, slug: str, model: Any) -> Any:
        if self.options.restore_check == "off":
            return None
        from editors.fingerprint import ModelFingerprint

        started = time.perf_counter()
        reference = ModelFingerprint.of(model, self.options.restore_check)
        log.info("model %s: %s restore-check fingerprint of %d tensors in %.3f s", slug, self.options.restore_check,
                 len(reference.names), time.perf_counter() - started)
        return reference

    def _verify_intact(self, state: ModelState, editor: str, during: str) -> None:
        """Check the whole model against its fingerprint after ``editor`` ran code outside an edit session (its
        set-up, its denominator reports); a change evicts the model (the next test loads it fresh) and raises
        UndeclaredChangeError. Nothing the hub caches is measured between such a check and the next test."""
        if state.reference is None or state.loaded is None:
            return
        from editors.fingerprint import UndeclaredChangeError

        try:
            state.reference.check(state.loaded.model, editor=editor, during=during)
        except UndeclaredChangeError as err:
            self._evict(state.slug, err)
            raise

    def held_model_changed(self, slug: str) -> HeldModelChangedError | None:
        """The error that retired ``slug``'s model object, when the caller holds it and an edit changed it beyond
        restoring; None otherwise."""
        state = self._states.get(slug)
        if slug not in self._held_models or state is None or state.load_error is None:
            return None
        error = state.load_error[0]
        return error if isinstance(error, HeldModelChangedError) else None

    def _evict(self, slug: str, cause: BaseException | None = None) -> None:
        """Release ``slug``'s model (its later tests load it again); ``cause``: the failed restore or undeclared
        change that makes the weights in memory no longer the model's."""
        state = self._states.get(slug)
        if state is None or state.loaded is None:
            return
        if slug in self._held_models and state.load_error is None:
            # the caller's own model object: it cannot be loaded again, so after a failed restore or an undeclared
            # change its later tests fail at once rather than measure a model that is no longer the one given
            error = HeldModelChangedError(
                f"model {slug}: the model object you gave was changed by an edit that could not be undone"
                f"{f' ({cause})' if cause is not None else ''}; its weights are no longer the ones given and "
                f"cannot be loaded again here: load the model afresh")
            state.load_error = (error, None)
        log.info("releasing model %s", slug)
        state.loaded = None
        state.reference = None
        state.resources = None
        state.editors.clear()  # they may hold covariances on the device
        state.prepared.clear()
        state.shared = None
        state.lower_blocks = None
        state.provided.clear()
        if slug in self._lru:
            self._lru.remove(slug)
        empty_cuda_cache()

    def _device_of(self, slug: str) -> str | None:
        """The device a record of model ``slug`` names (``devices.device_label``): where the model was loaded;
        before it ever was (its load failed), where the hub puts models, or None under a device map."""
        state = self._states.get(slug)
        device = state.device if state is not None else None
        if device is None and self.options.device_map is None and slug not in self._held_models:
            device = default_device()
        return None if device is None else device_label(device, os.environ.get("CUDA_VISIBLE_DEVICES"))



def default_device() -> str:
    """Where the hub puts a model without a device map: this process's first GPU (its own one on an xdist
    worker, which sees only its GPU), else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _clear_frames(error: BaseException) -> None:
    """Drop the local variables of the frames ``error`` and the exceptions it chains to passed through, keeping
    the traceback's lines: a failed load's frames may hold the half-loaded model's tensors on the GPU."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory is a courtesy
        log.debug("could not empty the CUDA cache", exc_info=True)
