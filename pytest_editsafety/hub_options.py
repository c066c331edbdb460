"""How a model hub runs its tests: :class:`HubOptions`, what the plugin's options and the API's arguments set.

Apart from :mod:`pytest_editsafety.hub` so that the option parsing can check values against it without importing the
hub."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_editsafety.bounds import Bounds
from pytest_editsafety.devices import MAIN_WORKER

__all__ = ["DEFAULT_RESTORE_CHECK", "PPL_BATCH_SIZE", "RESTORE_CHECKS", "HubOptions"]

PPL_BATCH_SIZE = 32
# the whole-model restore check after every test (editors.fingerprint.ModelFingerprint): every byte of every tensor
# checksummed ("full"), a fixed sample of each tensor's words ("sampled"), or none ("off")
RESTORE_CHECKS = ("full", "sampled", "off")
DEFAULT_RESTORE_CHECK = "full"


@dataclass(frozen=True)
class HubOptions:
    bounds: Bounds = field(default_factory=Bounds)
    dtype: str | None = None
    device_map: str | None = None
    # ROME/MEMIT .npz statistics directory; without it, C is computed over the statistics corpus
    stats_dir: str | None = None
    # corpus for second-moment statistics; None = each model's default (organism-wiki, wikitext-103)
    stats_corpus: str | None = None
    ppl_batch_size: int = PPL_BATCH_SIZE
    # loaded models kept at once: large models on one GPU do not fit twice
    max_loaded_models: int = 1
    # hparams overrides applied to every built-in editor (the collapse experiment's --layer)
    editor_overrides: Mapping[str, Any] | None = None
    # editor -> user hparams JSON files or named sets, layered in order (--editsafety-hparams), or a mapping of fields
    # (the API's), over the built-in file per model
    editor_hparams: Mapping[str, str | tuple[str, ...] | Mapping[str, Any]] | None = None
    # cache root for organisms, statistics, corpora, trained editors and floors (None: pytest_editsafety.cache's
    # default, $EDITSAFETY_CACHE or the user cache directory)
    cache_root: str | None = None
    # after every test, check that nothing outside the editor's declared parameters changed (RESTORE_CHECKS)
    restore_check: str = DEFAULT_RESTORE_CHECK
    # the process the hub runs in, as each record names it: an xdist worker id, or "main"
    worker: str = MAIN_WORKER
    # the BOS-stripped protocol (--editsafety-strip-bos, pytest_editsafety.bos): models load with a tokenizer that
    # prepends no BOS; a model the caller holds must come stripped already (the API strips a copy of its tokenizer)
    strip_bos: bool = False
    # a sequential run measures after every k-th edit and the last (--editsafety-sequential-every); None: each
    # model's default (pytest_editsafety.sequential.default_every)
    sequential_every: int | None = None
    # single-edit cases of one (editor, model, case set) whose searches (ROME's v*, MEMIT's z: editors'
    # prepare()) run together on the unedited model, the case under way and the next ones this run selected;
    # 1 measures each case alone (--editsafety-search-batch); None: preparation.default_search_batch for the device
    search_batch: int | None = None
    # a case's measurement that editors declare they share (editors.base.EditorBase.measurement_key: ROME and its
    # C-ROME variants' v*, MEMIT, EMMET and AlphaEdit's z) is measured by the first of them and handed to the
    # others (pytest_editsafety.shared_measurements); False: each editor measures its own
    # (--editsafety-measure-alone). Same records either way: bit for bit at a search batch of 1, to float rounding above
    share_measurements: bool = True
    # perplexity after an edit whose parameters all lie in blocks L and above replays the unedited output of the
    # blocks below L over the corpus instead of running them (pytest_editsafety.lower_blocks), under the full
    # restore check only; False: every measurement runs the whole model (--editsafety-ppl-full-pass). Same numbers
    # bit for bit
    ppl_skip_unedited_blocks: bool = True
    # lm-eval tasks scored on the unedited model and after every single edit (--editsafety-downstream), at most
    # downstream_limit examples each (None: all): pytest_editsafety.downstream
    downstream: tuple[str, ...] = ()
    downstream_limit: int | None = None
    # where the slow measurements of a model's set-up (C, the denominator floor) report their progress, a line every
    # few seconds, besides this module's log at INFO: the plugin's terminal, outside xdist workers
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.restore_check not in RESTORE_CHECKS:
            raise ValueError(f"HubOptions.restore_check: {self.restore_check!r} is not one of "
                             f"{', '.join(RESTORE_CHECKS)}")
        if self.search_batch is not None and (isinstance(self.search_batch, bool) or not isinstance(self.search_batch, int)
                                              or self.search_batch < 1):
            raise ValueError(f"HubOptions.search_batch must be an integer >= 1, got {self.search_batch!r}")
        for name in ("share_measurements", "ppl_skip_unedited_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HubOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if self.sequential_every is not None and self.sequential_every < 1:
            raise ValueError(f"HubOptions.sequential_every must be at least 1, got {self.sequential_every}")
