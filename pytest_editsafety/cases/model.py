"""The edit-case model: one frozen case type, its canonical dict form, and validation.

Conventions every consumer relies on:

* ``prompt`` is a template with exactly one ``{}`` where the subject goes; ``rewrite_prompt`` fills it.
* ``paraphrase_prompts`` and neighborhood prompts are full text (the subject, or another subject for the
  neighborhood, already in place).
* Targets (``target_new``, ``ground_truth``, neighborhood answers) are stored *without* a leading space.
  Scoring prepends one (``" " + target_new``) as the CounterFact code does, because the target
  continues the prompt as a new word; storing the bare word keeps files readable and lets a scorer
  choose another joiner for tokenizers where the space is not how a word starts.

Validation never stops at the first problem: ``case_problems`` lists them all, so a loader can report
every broken field of every entry of a file at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from pytest_editsafety.cases.problems import CaseProblem, CaseValidationError

MetadataValue = Union[str, int, float, bool]

PLACEHOLDER = "{}"


class FrozenMetadata(Mapping[str, MetadataValue]):
    """An immutable, hashable, picklable str -> scalar mapping (MappingProxyType pickles badly)."""

    __slots__ = ("_items",)

    def __init__(self, data: Mapping[str, MetadataValue] | Iterable[tuple[str, MetadataValue]] = ()) -> None:
        items = dict(data.items() if isinstance(data, Mapping) else data)
        bad = [k for k in items if not isinstance(k, str)]
        if bad:
            raise TypeError(f"metadata keys must be strings, got {bad!r}")
        object.__setattr__(self, "_items", tuple(sorted(items.items(), key=lambda kv: kv[0])))

    def __getitem__(self, key: str) -> MetadataValue:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        # Equality below is type-strict (True != 1, 1.0 != 1) so that a canonical round trip is
        # exact; the hash includes the type name to stay consistent with it.
        return hash(tuple((k, type(v).__name__, v) for k, v in self._items))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMetadata):
            return self._items == other._items and all(
                type(a) is type(b) for (_, a), (_, b) in zip(self._items, other._items)
            )
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMetadata is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMetadata, (self._items,))

    def __repr__(self) -> str:
        return f"FrozenMetadata({dict(self._items)!r})"

    def to_dict(self) -> dict[str, MetadataValue]:
        return dict(self._items)


@dataclass(frozen=True)
class NeighborhoodPrompt:
    """A prompt about another subject whose answer the edit must leave alone."""

    prompt: str
    answer: str


def _text_problems(name: str, value: object, *, allow_edge_space: bool = True) -> list[CaseProblem]:
    if not isinstance(value, str):
        return [CaseProblem(name, f"must be a string, got {type(value).__name__}")]
    if not value.strip():
        return [CaseProblem(name, "is empty or whitespace")]
    if not allow_edge_space and value != value.strip():
        return [
            CaseProblem(
                name,
                f"{value!r} has leading or trailing whitespace; targets are stored bare "
                "(scoring prepends the space itself)",
            )
        ]
    return []


def template_problems(prompt: object, name: str = "prompt") -> list[CaseProblem]:
    """Problems with a prompt template: it must hold ``{}`` exactly once, next to some text."""
    if not isinstance(prompt, str):
        return [CaseProblem(name, f"must be a string, got {type(prompt).__name__}")]
    count = prompt.count(PLACEHOLDER)
    if count == 0:
        return [CaseProblem(name, f"template {prompt!r} has no '{{}}' placeholder for the subject")]
    if count > 1:
        return [CaseProblem(name, f"template {prompt!r} has {count} '{{}}' placeholders; exactly one is needed")]
    if not prompt.replace(PLACEHOLDER, "").strip():
        return [CaseProblem(name, "template has nothing but the subject placeholder")]
    return []


def metadata_problems(metadata: object, name: str = "metadata") -> list[CaseProblem]:
    if not isinstance(metadata, Mapping):
        return [CaseProblem(name, f"must be an object of scalar values, got {type(metadata).__name__}")]
    problems: list[CaseProblem] = []
    for key, value in metadata.items():
        if not isinstance(key, str):
            problems.append(CaseProblem(name, f"key {key!r} is not a string"))
        elif not isinstance(value, (str, int, float, bool)) or value is None:
            problems.append(
                CaseProblem(f"{name}.{key}", f"must be a string, number or boolean, got {type(value).__name__}")
            )
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(CaseProblem(f"{name}.{key}", f"must be finite, got {value!r}"))
    return problems


class _Missing:
    """Marks a field the source entry did not have, so checks on it are skipped (it is reported once)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def case_problems(
    *,
    case_id: object,
    subject: object,
    prompt: object,
    target_new: object,
    ground_truth: object,
    paraphrase_prompts: object = (),
    neighborhood: object = (),
    metadata: object = None,
    is_hard: object = None,
) -> list[CaseProblem]:
    """Every problem with a case's fields, without location (the loader adds file and entry).

    A field passed as ``MISSING`` is skipped: its absence is reported by whoever noticed it.
    """
    problems: list[CaseProblem] = []
    if case_id is not MISSING:
        if not isinstance(case_id, str):
            problems.append(CaseProblem("case_id", f"must be a string, got {type(case_id).__name__}"))
        elif not case_id.strip():
            problems.append(CaseProblem("case_id", "is empty or whitespace"))

    if subject is not MISSING:
        subject_problems = _text_problems("subject", subject)
        if not subject_problems and isinstance(subject, str) and subject != subject.strip():
            subject_problems.append(
                CaseProblem(
                    "subject", f"{subject!r} has leading or trailing whitespace; the template carries the spaces"
                )
            )
        problems += subject_problems
    if prompt is not MISSING:
        problems += template_problems(prompt)

    if target_new is not MISSING:
        problems += _text_problems("target_new", target_new, allow_edge_space=False)
    if ground_truth is not MISSING:
        problems += _text_problems("ground_truth", ground_truth, allow_edge_space=False)
    if isinstance(target_new, str) and isinstance(ground_truth, str) and target_new.strip():
        if target_new.strip().casefold() == ground_truth.strip().casefold():
            problems.append(
                CaseProblem(
                    "target_new",
                    f"{target_new!r} equals the ground truth {ground_truth!r}; the edit would change nothing",
                )
            )

    if paraphrase_prompts is MISSING:
        pass
    elif not isinstance(paraphrase_prompts, (tuple, list)):
        problems.append(
            CaseProblem("paraphrase_prompts", f"must be a list of strings, got {type(paraphrase_prompts).__name__}")
        )
    else:
        for i, text in enumerate(paraphrase_prompts):
            if text is MISSING:
                continue
            problems += _text_problems(f"paraphrase_prompts[{i}]", text)
            if isinstance(text, str) and PLACEHOLDER in text:
                problems.append(
                    CaseProblem(
                        f"paraphrase_prompts[{i}]",
                        "contains '{}'; paraphrase prompts are stored with the subject filled in",
                    )
                )

    if neighborhood is MISSING:
        pass
    elif not isinstance(neighborhood, (tuple, list)):
        problems.append(
            CaseProblem("neighborhood", f"must be a list of prompt/answer pairs, got {type(neighborhood).__name__}")
        )
    else:
        for i, item in enumerate(neighborhood):
            if not isinstance(item, NeighborhoodPrompt):
                problems.append(
                    CaseProblem(f"neighborhood[{i}]", f"must be a NeighborhoodPrompt, got {type(item).__name__}")
                )
                continue
            if item.prompt is not MISSING:
                problems += _text_problems(f"neighborhood[{i}].prompt", item.prompt)
                if isinstance(item.prompt, str) and PLACEHOLDER in item.prompt:
                    problems.append(
                        CaseProblem(
                            f"neighborhood[{i}].prompt",
                            "contains '{}'; neighborhood prompts are full text about another subject",
                        )
                    )
            if item.answer is not MISSING:
                problems += _text_problems(f"neighborhood[{i}].answer", item.answer, allow_edge_space=False)

    if metadata is not None and metadata is not MISSING:
        problems += metadata_problems(metadata)
    if is_hard is not None and is_hard is not MISSING and not isinstance(is_hard, bool):
        problems.append(CaseProblem("is_hard", f"must be true, false or null, got {type(is_hard).__name__}"))
    return problems


@dataclass(frozen=True)
class EditCase:
    """One requested edit: make ``rewrite_prompt`` continue with ``target_new`` instead of ``ground_truth``.

    ``is_hard`` is None until a tokenizer-aware classifier (``cases.classify``) sets it: hardness is a
    property of a case *and* a model's tokenizer, not of the case alone.
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    ground_truth: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[NeighborhoodPrompt, ...] = ()
    metadata: Mapping[str, MetadataValue] = field(default_factory=FrozenMetadata)
    is_hard: bool | None = None

    def __post_init__(self) -> None:
        # Accept lists and dicts from callers but store immutable, hashable forms.
        if isinstance(self.paraphrase_prompts, list):
            object.__setattr__(self, "paraphrase_prompts", tuple(self.paraphrase_prompts))
        if isinstance(self.neighborhood, list):
            object.__setattr__(self, "neighborhood", tuple(self.neighborhood))
        if self.metadata is None:
            object.__setattr__(self, "metadata", FrozenMetadata())
        problems = case_problems(
            case_id=self.case_id,
            subject=self.subject,
            prompt=self.prompt,
            target_new=self.target_new,
            ground_truth=self.ground_truth,
            paraphrase_prompts=self.paraphrase_prompts,
            neighborhood=self.neighborhood,
            metadata=self.metadata,
            is_hard=self.is_hard,
        )
        if problems:
            case_id = self.case_id if isinstance(self.case_id, str) else None
            raise CaseValidationError([p.located(case_id=case_id) for p in problems])
        if not isinstance(self.metadata, FrozenMetadata):
            object.__setattr__(self, "metadata", FrozenMetadata(self.metadata))

    @property
    def rewrite_prompt(self) -> str:
        """The prompt with the subject in place (``str.replace``, so other braces stay literal)."""
        return self.prompt.replace(PLACEHOLDER, self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject inside ``rewrite_prompt``."""
        start = self.prompt.index(PLACEHOLDER)
        return start, start + len(self.subject)

    def with_hard(self, flag: bool | None) -> EditCase:
        return dataclasses.replace(self, is_hard=flag)

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form: plain types only, stable key order."""
        out: dict[str, Any] = {
            "case_id": self.case_id,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood": [{"prompt": n.prompt, "answer": n.answer} for n in self.neighborhood],
            "metadata": dict(self.metadata),
        }
        if self.is_hard is not None:
            out["is_hard"] = self.is_hard
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditCase:
        """Inverse of ``to_dict``; raises ``CaseValidationError`` listing every problem found."""
        case, problems = canonical_entry_to_case(data, default_id=None)
        if case is None:
            raise CaseValidationError(problems)
        return case


CASE_FIELDS = (
    "case_id",
    "subject",
    "prompt",
    "target_new",
    "ground_truth",
    "paraphrase_prompts",
    "neighborhood",
    "metadata",
    "is_hard",
)
CANONICAL_REQUIRED = ("subject", "prompt", "target_new", "ground_truth")
CANONICAL_OPTIONAL = ("case_id", "paraphrase_prompts", "neighborhood", "metadata", "is_hard")


def coerce_case_id(value: object, default: str | None) -> tuple[Any, list[CaseProblem]]:
    """A file's id as a string; ints are accepted (CounterFact's ids are ints), bools are not."""
    if value is None or value is MISSING:
        if default is None:
            return MISSING, [CaseProblem("case_id", "is missing")]
        return default, []
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return MISSING, [CaseProblem("case_id", f"must be a string or an integer, got {type(value).__name__}")]
    text = str(value)
    if not text.strip():
        return MISSING, [CaseProblem("case_id", "is empty or whitespace")]
    return text, []


def assemble_case(
    values: Mapping[str, Any], problems: Sequence[CaseProblem] = ()
) -> tuple[EditCase | None, list[CaseProblem]]:
    """Validate converted field values (``MISSING`` where absent) and build the case if all is well.

    ``problems`` are those the converter already found (types, missing keys); the field checks run
    anyway so one pass reports everything about the entry.
    """
    found = list(problems)
    found += case_problems(**{k: values.get(k, MISSING) for k in CASE_FIELDS})
    if found:
        return None, found
    neighborhood = tuple(values.get("neighborhood", ()))
    case = EditCase(
        case_id=values["case_id"],
        subject=values["subject"],
        prompt=values["prompt"],
        target_new=values["target_new"],
        ground_truth=values["ground_truth"],
        paraphrase_prompts=tuple(values.get("paraphrase_prompts", ())),
        neighborhood=neighborhood,
        metadata=FrozenMetadata(values.get("metadata") or {}),
        is_hard=values.get("is_hard"),
    )
    return case, []


def canonical_entry_values(
    data: Mapping[str, Any], *, default_id: str | None
) -> tuple[dict[str, Any], list[CaseProblem]]:
    """Field values of one canonical entry (the ``to_dict`` form) plus its structural problems."""
    problems: list[CaseProblem] = []
    for key in CANONICAL_REQUIRED:
        if key not in data:
            problems.append(CaseProblem(key, "is missing"))
    known = CANONICAL_REQUIRED + CANONICAL_OPTIONAL
    for key in sorted(str(k) for k in data if k not in known):
        problems.append(CaseProblem(key, f"is not a field of the canonical format (known: {', '.join(known)})"))
    values: dict[str, Any] = {k: data.get(k, MISSING) for k in CANONICAL_REQUIRED}
    values["case_id"], id_problems = coerce_case_id(data.get("case_id"), default_id)
    problems += id_problems

    paraphrases = data.get("paraphrase_prompts", [])
    if isinstance(paraphrases, list):
        values["paraphrase_prompts"] = tuple(paraphrases)
    else:
        problems.append(
            CaseProblem("paraphrase_prompts", f"must be a list of strings, got {type(paraphrases).__name__}")
        )
        values["paraphrase_prompts"] = MISSING

    raw_neighborhood = data.get("neighborhood", [])
    neighborhood: list[NeighborhoodPrompt] = []
    if not isinstance(raw_neighborhood, list):
        problems.append(
            CaseProblem(
                "neighborhood",
                f'must be a list of {{"prompt", "answer"}} objects, got {type(raw_neighborhood).__name__}',
            )
        )
    else:
        for i, item in enumerate(raw_neighborhood):
            if not isinstance(item, Mapping):
                problems.append(
                    CaseProblem(
                        f"neighborhood[{i}]", f"must be an object with prompt and answer, got {type(item).__name__}"
                    )
                )
                continue
            for key in ("prompt", "answer"):
                if key not in item:
                    problems.append(CaseProblem(f"neighborhood[{i}].{key}", "is missing"))
            for key in sorted(str(k) for k in item if k not in ("prompt", "answer")):
                problems.append(CaseProblem(f"neighborhood[{i}].{key}", "is not a neighborhood field (prompt, answer)"))
            neighborhood.append(
                NeighborhoodPrompt(prompt=item.get("prompt", MISSING), answer=item.get("answer", MISSING))
            )
    values["neighborhood"] = tuple(neighborhood)
    values["metadata"] = data.get("metadata", {})
    values["is_hard"] = data.get("is_hard")
    return values, problems


def canonical_entry_to_case(
    data: object, *, default_id: str | None
) -> tuple[EditCase | None, list[CaseProblem]]:
    """Build a case from one canonical entry, or return every problem found in it."""
    if not isinstance(data, Mapping):
        return None, [CaseProblem("(entry)", f"must be a JSON object, got {type(data).__name__}")]
    values, problems = canonical_entry_values(data, default_id=default_id)
    return assemble_case(values, problems)


def duplicate_id_problems(
    cases: Sequence[EditCase],
    *,
    indices: Sequence[int] | None = None,
    lines: Sequence[int | None] | None = None,
) -> list[CaseProblem]:
    """One problem per case whose id an earlier case already used.

    ``indices``/``lines`` give each case's entry number and line in its file when they differ from
    its position (a loader that dropped invalid entries).
    """
    first_seen: dict[str, int] = {}
    problems: list[CaseProblem] = []
    for position, case in enumerate(cases):
        index = indices[position] if indices is not None else position
        if case.case_id in first_seen:
            problems.append(
                CaseProblem(
                    "case_id",
                    f"duplicate id {case.case_id!r} (first used by entry {first_seen[case.case_id]})",
                    index=index,
                    case_id=case.case_id,
                    line=lines[position] if lines is not None else None,
                )
            )
        else:
            first_seen[case.case_id] = index
    return problems


@dataclass(frozen=True)
class CaseSet:
    """A named, ordered collection of cases with unique ids; ``source`` is where it came from."""

    name: str
    cases: tuple[EditCase, ...]
    source: str
    format: str

    def __post_init__(self) -> None:
        if isinstance(self.cases, list):
            object.__setattr__(self, "cases", tuple(self.cases))
        problems: list[CaseProblem] = []
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append(CaseProblem("name", "a case set needs a non-empty name", file=str(self.source)))
        bad = [i for i, c in enumerate(self.cases) if not isinstance(c, EditCase)]
        problems += [
            CaseProblem("(entry)", f"is not an EditCase but {type(self.cases[i]).__name__}", index=i) for i in bad
        ]
        if not bad:
            problems += duplicate_id_problems(self.cases)
        if problems:
            raise CaseValidationError([p.located(file=str(self.source)) for p in problems])

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[EditCase]:
        return iter(self.cases)

    def by_id(self, case_id: str) -> EditCase:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in case set {self.name!r}")

    def with_cases(self, cases: Iterable[EditCase]) -> CaseSet:
        return dataclasses.replace(self, cases=tuple(cases))

    def hard(self) -> tuple[EditCase, ...]:
        return tuple(c for c in self.cases if c.is_hard is True)

    def normal(self) -> tuple[EditCase, ...]:
        return tuple(c for c in self.cases if c.is_hard is False)
