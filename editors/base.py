"""The editor contract: what an editing method declares, what it is given, what it takes and returns.

An editor is set up once per loaded model and then edits it many times:

1. ``needs(model, family)`` declares what the editor needs beyond the model (:class:`Needs`): second moments
   ``C`` of an MLP output projection's inputs at some layers, ROME-style context templates, a trained network.
2. The caller provides exactly that (:class:`Provided`) through ``setup(model, tokenizer, family, provided)``,
   measured on the *unedited* model. The harness is one such caller (C over the model's statistics corpus or
   ROME's ``.npz`` files, templates sampled once per model, networks from its cache); a platform with a loaded
   model is another (:func:`editors.provision.set_up` with its own provider).
3. ``apply(model, tokenizer, family, requests)`` edits the model in place; the caller snapshots and restores
   the parameters named by ``parameters_touched``.

Optional reports have defaults in :class:`EditorBase`, so a third-party editor that subclasses it implements
only what it has: ``max_requests_per_apply`` (how many requests one ``apply`` call takes: 1 by default, None for
no limit; batch certification reads it), ``denominator(...)`` (the rank-one update's ``|uᵀk|``, from keys alone;
the certification's
denominator floor, case mining and pre-flight checks read it; None when the method has no such quantity) and
``provenance()`` (which trained artefact edits, for the certificate), and ``prepare(...)`` with
``apply_prepared(...)`` (measure several requests' edits at once on the unedited model, then apply each without
measuring again: the harness batches ROME's and MEMIT's searches this way). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "EditOutcome",
    "EditRequest",
    "Editor",
    "EditorBase",
    "Needs",
    "Provided",
    "SecondMomentNeed",
    "TrainedNetworkNeed",
    "TrainingCase",
    "TrainingJob",
    "max_requests_per_apply",
    "measurement_key",
    "prepare_requests",
    "prepared_by",
]


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` holds ``{}`` where ``subject`` goes; the model should continue with ``target_new``."""

    subject: str
    prompt: str
    target_new: str

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(f"EditRequest.prompt must contain exactly one '{{}}': {self.prompt!r}")
        if not self.subject.strip():
            raise ValueError("EditRequest.subject is empty")
        if not self.target_new.strip():
            raise ValueError("EditRequest.target_new is empty")

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)


@dataclass(frozen=True)
class EditOutcome:
    """What an edit did. ``diagnostics`` holds plain floats/ints/strs (it crosses xdist boundaries);
    ``denominator`` there is a magnitude ``|uᵀk|`` when the method has one. ``edited`` names the parameters
    changed in place; ``test_prefix`` asks the caller to prepend that text to test prompts of hard cases
    (C-ROME + prefix)."""

    edited: tuple[str, ...]
    diagnostics: Mapping[str, float | int | str] = field(default_factory=dict)
    test_prefix: str | None = None


@dataclass(frozen=True)
class TrainingCase:
    """One training edit for a trained editor: the edit, an equivalent phrasing that should follow it, and
    texts whose predictions should not move (locality)."""

    edit: EditRequest
    equivalent: EditRequest
    locality: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.locality or not all(isinstance(t, str) and t.strip() for t in self.locality):
            raise ValueError(f"TrainingCase {self.edit.text!r}: needs non-empty locality texts")
        if self.equivalent.target_new != self.edit.target_new:
            raise ValueError(f"TrainingCase {self.edit.text!r}: the equivalent request has another target")


@dataclass(frozen=True)
class TrainingJob:
    """What a :class:`TrainedNetworkNeed`'s ``train`` callable gets: the unedited model, the training edits and
    their description (recorded with the network), and the empty directory to write the network into."""

    model: Any
    tokenizer: Any
    family: Any
    cases: tuple[TrainingCase, ...]
    data: Mapping[str, Any]
    identity: str
    directory: Path
    progress: bool = False


@dataclass(frozen=True)
class SecondMomentNeed:
    """``C = E[k kᵀ]`` of the MLP output projection's inputs at ``layers``, over at most ``n_samples`` texts of
    the statistics corpus (ROME's ``mom2_n_samples``)."""

    layers: tuple[int, ...]
    n_samples: int = 100000


@dataclass(frozen=True)
class TrainedNetworkNeed:
    """A network trained for this model (MEND's hypernetwork).

    ``kind`` names the family of artefact (a folder of the cache; the editor's name when one editor uses it),
    ``key`` everything the network depends on
    besides the model's identity and dtype (the hyper-parameters that shape and train it). Where no trained
    network exists, a caller that can make training edits for the model (the harness, for its model organisms)
    calls ``train`` with ``n_training_cases`` of them drawn with ``seed``; any other caller reports what is
    missing and ``train_hint``, the command that trains one.
    """

    kind: str
    key: Mapping[str, Any]
    # trains and writes the network into job.directory; returns a summary of the training (plain values)
    train: Callable[[TrainingJob], Mapping[str, Any]]
    n_training_cases: int
    seed: int = 0
    train_hint: str = ""


@dataclass(frozen=True)
class Needs:
    """What an editor needs from its caller; None or empty fields are not needed."""

    second_moments: SecondMomentNeed | None = None
    # ROME's (length, count) recipe for context templates, e.g. ((5, 10), (10, 10))
    context_templates: tuple[tuple[int, int], ...] | None = None
    trained_network: TrainedNetworkNeed | None = None
    # tokens of the model's ordinary text (its perplexity corpus) the editor reads to say how far an edit reaches
    # beyond its subject (ROME's interference); a provider without such text gives none, and the editor says less
    ordinary_text: int | None = None


@dataclass(frozen=True)
class Provided:
    """What the caller provides for :class:`Needs`, measured on the unedited model. ``identity`` names the
    weights (an organism's recipe hash, ``repo@commit``, a local file hash); ``second_moments`` maps a layer to
    its ``C`` (a torch tensor), ``trained_network`` is the directory holding the network, ``ordinary_texts`` the
    texts of the model's ordinary text (empty when the provider has none)."""

    identity: str = ""
    second_moments: Mapping[int, Any] = field(default_factory=lambda: MappingProxyType({}))
    context_templates: tuple[str, ...] | None = None
    trained_network: Path | None = None
    ordinary_texts: tuple[str, ...] = ()


@runtime_checkable
class Editor(Protocol):
    """What a caller needs from an editor (subclass :class:`EditorBase` for the optional parts)."""

    name: str
    # the editor's hyper-parameters (a frozen dataclass or a mapping of JSON values): hashed into certificates
    hparams: Any

    def needs(self, model: Any, family: Any) -> Needs: ...

    def setup(self, model: Any, tokenizer: Any, family: Any, provided: Provided) -> None: ...

    def parameters_touched(self, model: Any, family: Any) -> tuple[str, ...]:
        """Names of the parameters ``apply`` may change (snapshotted before the edit)."""
        ...

    def apply(self, model: Any, tokenizer: Any, family: Any, requests: list[EditRequest]) -> EditOutcome:
        """Edit ``model`` in place; the caller snapshots and restores the parameters the editor names."""
        ...

    def denominator(self, model: Any, tokenizer: Any, family: Any, request: EditRequest) -> Mapping[str, float] | None:
        """``{"denominator": |uᵀk|, ...}`` the edit of ``request`` would divide by, from keys alone (no
        optimisation, no weight change), plus any other key measures; None for a method without one."""
        ...

    def provenance(self) -> Mapping[str, str]:
        """Which trained artefact edits (e.g. an archive's sha256); empty for an untrained method."""
        ...


class EditorBase:
    """Defaults for the optional parts of :class:`Editor`: no needs, ``setup`` keeps what it is given, one
    request per ``apply``, no denominator, no provenance. Subclasses set ``name`` and ``hparams`` and implement
    ``parameters_touched`` and ``apply``."""

    name: str = ""
    hparams: Any = None
    provided: Provided = Provided()
    # How many requests one apply() call writes at once: 1 (the default) for a method that edits one fact at a
    # time (ROME, FT, MEND), None for no limit (MEMIT, EMMET, AlphaEdit take a whole batch in one update). A
    # caller that certifies batches (--editsafety-batch-size) gives apply() at most this many requests.
    max_requests_per_apply: int | None = 1

    def needs(self, model: Any, family: Any) -> Needs:
        return Needs()

    def setup(self, model: Any, tokenizer: Any, family: Any, provided: Provided) -> None:
        self.provided = provided

    # what apply_prepared() handed in for the call under way; empty outside one
    _in_hand: Mapping[EditRequest, Any] = MappingProxyType({})

    def denominator(self, model: Any, tokenizer: Any, family: Any, request: EditRequest) -> Mapping[str, float] | None:
        return None

    def provenance(self) -> Mapping[str, str]:
        return {}

    def prepare(self, model: Any, tokenizer: Any, family: Any,
                requests: Sequence[EditRequest]) -> Mapping[EditRequest, Any]:
        """What ``apply`` would measure on the model as it is for each of ``requests`` (ROME's v*, MEMIT's z),
        measured for all of them at once: opaque values by request, which a caller hands back to
        :meth:`apply_prepared` while the model is still the one they were measured on. The default prepares
        nothing (``{}``); an editor whose measurement batches (the searches of ROME and MEMIT) overrides it."""
        return {}

    def measurement_key(self, request: EditRequest) -> Hashable | None:
        """What :meth:`prepare` measures for ``request``, as a key: editors (of any name) whose keys are equal
        measure the same value on the same unedited model, so a caller may measure it once and hand it to each
        through :meth:`apply_prepared` (ROME and its C-ROME variants share v*; MEMIT, EMMET and AlphaEdit share z).
        The key holds everything the value depends on besides the model's weights: the kind of value, the
        settings the measurement reads, the context templates and the request. None (the default): the
        measurement is this editor's own."""
        return None

    def apply_prepared(self, model: Any, tokenizer: Any, family: Any, requests: list[EditRequest],
                       prepared: Mapping[EditRequest, Any]) -> EditOutcome:
        """``apply``, taking from ``prepared`` (:meth:`prepare`'s values, measured on this model as it is now)
        what it would otherwise measure: the same edit, without measuring it again."""
        self._in_hand = prepared
        try:
            return self.apply(model, tokenizer, family, requests)
        finally:
            del self._in_hand  # back to the class's empty mapping

    def prepared_for(self, request: EditRequest) -> Any:
        """The value :meth:`prepare` measured for ``request`` when :meth:`apply_prepared` handed it in; else None."""
        return self._in_hand.get(request)


def prepare_requests(editor: Any, model: Any, tokenizer: Any, family: Any,
                     requests: Sequence[EditRequest]) -> Mapping[EditRequest, Any]:
    """``editor.prepare(...)`` for an :class:`EditorBase`; an editor that only implements the :class:`Editor`
    protocol prepares nothing (``{}``) and is applied as it is."""
    return editor.prepare(model, tokenizer, family, requests) if isinstance(editor, EditorBase) else {}


def prepared_by(editor: Any, methods: Sequence[str] = ("prepare",)) -> tuple[str, ...]:
    """The functions that measure ``editor``'s prepared values (``module.Class.prepare`` and whatever else of its
    ``methods`` the value depends on): the kind of value part of a measurement key, so a subclass that measures
    otherwise (overrides one of them) shares with no one."""
    found = []
    for name in methods:
        function = getattr(type(editor), name)
        found.append(f"{function.__module__}.{function.__qualname__}")
    return tuple(found)


def measurement_key(editor: Any, request: EditRequest) -> Hashable | None:
    """``editor.measurement_key(request)`` for an :class:`EditorBase`; None (nothing shared) for an editor that
    only implements the :class:`Editor` protocol."""
    return editor.measurement_key(request) if isinstance(editor, EditorBase) else None


def max_requests_per_apply(editor: Any) -> int | None:
    """How many requests ``editor``'s ``apply`` takes at once, as it declares it
    (:attr:`EditorBase.max_requests_per_apply`; None: no limit). An editor that implements the :class:`Editor`
    protocol without subclassing :class:`EditorBase` and declares nothing takes one, the contract's default."""
    declared = getattr(editor, "max_requests_per_apply", 1)
    if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
        raise ValueError(f"editor {getattr(editor, 'name', editor)!r}: max_requests_per_apply must be an integer >= 1 "
                         f"or None, got {declared!r}")
    return declared
