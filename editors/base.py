"""The editor protocol: what every editing method takes and returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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
    ``edited`` names the parameters changed in place; ``test_prefix`` asks the harness to prepend that text to
    test prompts of hard cases (C-ROME + prefix)."""

    edited: tuple[str, ...]
    diagnostics: Mapping[str, float | int | str] = field(default_factory=dict)
    test_prefix: str | None = None


@runtime_checkable
class Editor(Protocol):
    """What the harness needs from an editor. An editor may also define
    ``prepare(model, tokenizer, family, *, identity)``, which the harness calls once per model on the unedited
    model before any edit, with the model registry's identity of the weights (MEND loads its trained network
    there); it is optional, so not part of this protocol."""

    name: str

    def apply(self, model: Any, tokenizer: Any, family: Any, requests: list[EditRequest]) -> EditOutcome:
        """Edit ``model`` in place; the caller snapshots and restores the parameters the editor names."""
        ...

    def parameters_touched(self, model: Any, family: Any) -> tuple[str, ...]:
        """Names of the parameters ``apply`` may change (snapshotted before the edit)."""
        ...
