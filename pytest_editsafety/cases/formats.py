"""The entry formats of edit-case files, detected from an entry's keys, each with its converter to a case.

Entry formats (one JSON object per case):

* ``counterfact`` -- ROME/MEMIT CounterFact: ``requested_rewrite{prompt, subject, target_new{str},
  target_true{str}}``, ``paraphrase_prompts``, ``neighborhood_prompts`` (answered by target_true).
* ``zsre`` -- the MEND/ROME ``zsre_mend_eval`` shape: ``src`` (the full question), ``subject``, ``alt``,
  ``answers``, ``rephrase``, ``loc`` (kept as is, "nq question: " included), ``loc_ans``.
* ``easyedit`` -- the flat EasyEdit shape the collapse papers' HardCF/HardEdit loaders use: ``prompt``
  (full text), ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
  ``locality_ground_truth`` (the last three a string or a list).
* ``canonical`` -- this project's own form (``EditCase.to_dict``).

A converter's problems name the field as the *source* format spells it (``requested_rewrite.target_new.str``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_editsafety.cases.containers import is_envelope
from pytest_editsafety.cases.model import (
    MISSING,
    PLACEHOLDER,
    EditCase,
    NeighborhoodPrompt,
    assemble_case,
    canonical_entry_values,
    coerce_case_id,
)
from pytest_editsafety.cases.problems import CaseFormatError, CaseProblem

__all__ = [
    "CANONICAL",
    "COUNTERFACT",
    "EASYEDIT",
    "KNOWN_FORMATS",
    "ZSRE",
    "detect_entry_format",
    "detect_format",
    "entry_to_case",
    "unknown_shape",
]

COUNTERFACT = "counterfact"
ZSRE = "zsre"
EASYEDIT = "easyedit"
CANONICAL = "canonical"

# What each entry format needs, for the message that explains an unrecognised entry.
FORMAT_KEYS: Mapping[str, str] = {
    COUNTERFACT: "requested_rewrite{prompt, subject, target_new{str}, target_true{str}}, "
    "paraphrase_prompts, neighborhood_prompts",
    ZSRE: "src, subject, alt, answers, rephrase, loc, loc_ans",
    EASYEDIT: "prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth",
    CANONICAL: "subject, prompt (with '{}'), target_new, ground_truth, paraphrase_prompts, neighborhood",
}

_ZSRE_MARKERS = ("src", "alt", "loc_ans", "answers")
_EASYEDIT_MARKERS = ("rephrase_prompt", "locality_prompt", "locality_ground_truth")
_CANONICAL_MARKERS = ("neighborhood",)

Rename = Callable[[str], str]
# A converter's result: canonical field values (MISSING where absent), the problems it found (named by
# canonical field), and the function that renames a canonical field to the source format's spelling.
Converted = tuple[dict[str, Any], list[CaseProblem], Rename]


# ---------------------------------------------------------------------------------------------
# detection


def detect_entry_format(entry: object) -> str | None:
    """The format of one entry, or None when it matches none (markers first, then the prompt)."""
    if not isinstance(entry, Mapping):
        return None
    if "requested_rewrite" in entry:
        return COUNTERFACT
    if any(k in entry for k in _ZSRE_MARKERS):
        return ZSRE
    if any(k in entry for k in _EASYEDIT_MARKERS):
        return EASYEDIT
    if any(k in entry for k in _CANONICAL_MARKERS):
        return CANONICAL
    prompt = entry.get("prompt")
    if isinstance(prompt, str) and ("target_new" in entry or "subject" in entry):
        # The one real difference between a bare canonical entry and a bare EasyEdit one: canonical
        # prompts are templates, EasyEdit prompts are full text.
        return CANONICAL if PLACEHOLDER in prompt else EASYEDIT
    return None


def detect_format(obj: object) -> str:
    """The case format of a parsed document (list, envelope) or of a single entry.

    Raises ``CaseFormatError`` when nothing is recognised, listing the keys it saw.
    """
    if is_envelope(obj):
        return CANONICAL
    if isinstance(obj, list):
        for index, entry in enumerate(obj):
            found = detect_entry_format(entry)
            if found is not None:
                return found
        raise CaseFormatError([unknown_shape(obj[0] if obj else None, index=0 if obj else None)])
    found = detect_entry_format(obj)
    if found is None:
        raise CaseFormatError([unknown_shape(obj, index=None)])
    return found


def unknown_shape(entry: object, *, index: int | None) -> CaseProblem:
    """The problem with an entry no format recognises: the keys it has and those each format needs."""
    if isinstance(entry, Mapping):
        saw = f"keys {sorted(str(k) for k in entry)}" if entry else "an empty object"
    else:
        saw = f"a {type(entry).__name__}, not an object"
    known = "; ".join(f"{name}: {keys}" for name, keys in FORMAT_KEYS.items())
    return CaseProblem("(keys)", f"unrecognised entry shape, saw {saw}; known formats need: {known}", index=index)


# ---------------------------------------------------------------------------------------------
# converters: raw entry -> canonical field values, problems (canonical field names), renamer


def _scalar_extras(entry: Mapping[str, Any], consumed: Sequence[str]) -> dict[str, Any]:
    """A source entry's other scalar fields, kept as metadata (lists and objects are dropped)."""
    extras: dict[str, Any] = {}
    for key, value in entry.items():
        if key in consumed or not isinstance(key, str):
            continue
        if isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            extras[key] = value
    return extras


def _text(container: Mapping[str, Any], key: str, name: str, problems: list[CaseProblem]) -> Any:
    """A required string field: MISSING (with a problem) when absent or of the wrong type."""
    if key not in container:
        problems.append(CaseProblem(name, "is missing"))
        return MISSING
    value = container[key]
    if not isinstance(value, str):
        problems.append(CaseProblem(name, f"must be a string, got {type(value).__name__}"))
        return MISSING
    return value


def _target(value: Any) -> Any:
    # Targets are stored bare: a file's " Paris" is the same target as "Paris".
    return value.strip() if isinstance(value, str) else value


def _text_list(
    container: Mapping[str, Any], key: str, name: str, problems: list[CaseProblem], *, allow_str: bool
) -> tuple[list[Any], bool]:
    """An optional list-of-strings field (or a lone string where the format allows one).

    Returns the items and whether the source held a list (so problems can say ``key[i]`` or ``key``).
    """
    if key not in container or container[key] is None:
        return [], False
    value = container[key]
    if isinstance(value, str) and allow_str:
        return [value], False
    if not isinstance(value, list):
        kind = "a string or a list of strings" if allow_str else "a list of strings"
        problems.append(CaseProblem(name, f"must be {kind}, got {type(value).__name__}"))
        return [], False
    items: list[Any] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            problems.append(CaseProblem(f"{name}[{i}]", f"must be a string, got {type(item).__name__}"))
            items.append(MISSING)
        else:
            items.append(item)
    return items, True


def _indexed(field: str, stem: str) -> tuple[int, str] | None:
    """Split ``stem[3].rest`` into (3, ".rest"); None when ``field`` is not an item of ``stem``."""
    if not field.startswith(stem + "["):
        return None
    close = field.index("]", len(stem))
    return int(field[len(stem) + 1 : close]), field[close + 1 :]


def _list_name(key: str, index: int, was_list: bool) -> str:
    return f"{key}[{index}]" if was_list else key


def _template_from_full_text(full: Any, subject: Any, full_name: str, problems: list[CaseProblem]) -> Any:
    """Turn a full prompt into a template by replacing the first occurrence of the subject."""
    if full is MISSING or subject is MISSING or not subject.strip():
        return MISSING
    if subject not in full:
        problems.append(CaseProblem("subject", f"{subject!r} does not occur in {full_name} {full!r}"))
        return MISSING
    return full.replace(subject, PLACEHOLDER, 1)


def _convert_counterfact(entry: Mapping[str, Any], default_id: str) -> Converted:
    problems: list[CaseProblem] = []
    values: dict[str, Any] = {}
    values["case_id"], id_problems = coerce_case_id(entry.get("case_id", entry.get("id")), default_id)
    problems += id_problems
    rr = entry.get("requested_rewrite")
    if not isinstance(rr, Mapping):
        problems.append(CaseProblem("requested_rewrite", f"must be an object, got {type(rr).__name__}"))
        rr = {}
    subject = _text(rr, "subject", "requested_rewrite.subject", problems)
    values["subject"] = subject
    values["prompt"] = _text(rr, "prompt", "requested_rewrite.prompt", problems)

    def target(key: str) -> Any:
        name = f"requested_rewrite.{key}"
        if key not in rr:
            problems.append(CaseProblem(name, "is missing"))
            return MISSING
        raw = rr[key]
        if isinstance(raw, str):  # a bare string is unambiguous, so accept it
            return _target(raw)
        if not isinstance(raw, Mapping):
            problems.append(CaseProblem(name, f'must be an object like {{"str": "..."}}, got {type(raw).__name__}'))
            return MISSING
        return _target(_text(raw, "str", f"{name}.str", problems))

    values["target_new"] = target("target_new")
    values["ground_truth"] = target("target_true")

    paraphrases, _ = _text_list(entry, "paraphrase_prompts", "paraphrase_prompts", problems, allow_str=False)
    if isinstance(subject, str):
        # Some CounterFact derivatives keep '{}' in paraphrases; the meaning is unambiguous.
        paraphrases = [
            p.replace(PLACEHOLDER, subject, 1) if isinstance(p, str) and p.count(PLACEHOLDER) == 1 else p
            for p in paraphrases
        ]
    values["paraphrase_prompts"] = tuple(paraphrases)
    neighbors, _ = _text_list(entry, "neighborhood_prompts", "neighborhood_prompts", problems, allow_str=False)
    values["neighborhood"] = tuple(NeighborhoodPrompt(prompt=p, answer=values["ground_truth"]) for p in neighbors)

    metadata = _scalar_extras(
        entry, ("case_id", "id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")
    )
    metadata.update(_scalar_extras(rr, ("subject", "prompt", "target_new", "target_true")))
    for key in ("target_new", "target_true"):
        raw = rr.get(key)
        target_id = raw.get("id") if isinstance(raw, Mapping) else None
        if isinstance(target_id, (str, int)) and not isinstance(target_id, bool):
            metadata[f"{key}_id"] = target_id
    values["metadata"] = metadata

    def rename(field: str) -> str:
        simple = {
            "subject": "requested_rewrite.subject",
            "prompt": "requested_rewrite.prompt",
            "target_new": "requested_rewrite.target_new.str",
            "ground_truth": "requested_rewrite.target_true.str",
        }
        if field in simple:
            return simple[field]
        hit = _indexed(field, "neighborhood")
        if hit is not None:
            index, rest = hit
            return "requested_rewrite.target_true.str" if rest == ".answer" else f"neighborhood_prompts[{index}]"
        return field

    return values, problems, rename


def _convert_zsre(entry: Mapping[str, Any], default_id: str) -> Converted:
    problems: list[CaseProblem] = []
    values: dict[str, Any] = {}
    values["case_id"], id_problems = coerce_case_id(entry.get("case_id", entry.get("id")), default_id)
    problems += id_problems
    subject = _text(entry, "subject", "subject", problems)
    src = _text(entry, "src", "src", problems)
    values["subject"] = subject
    values["prompt"] = _template_from_full_text(src, subject, "src", problems)
    values["target_new"] = _target(_text(entry, "alt", "alt", problems))

    answers = entry.get("answers", MISSING)
    if answers is MISSING:
        problems.append(CaseProblem("answers", "is missing"))
        values["ground_truth"] = MISSING
    elif isinstance(answers, str):
        values["ground_truth"] = _target(answers)
    elif isinstance(answers, list) and answers:
        if isinstance(answers[0], str):
            values["ground_truth"] = _target(answers[0])
        else:
            problems.append(CaseProblem("answers[0]", f"must be a string, got {type(answers[0]).__name__}"))
            values["ground_truth"] = MISSING
    else:
        got = "an empty list" if isinstance(answers, list) else type(answers).__name__
        problems.append(CaseProblem("answers", f"must be a non-empty list of strings, got {got}"))
        values["ground_truth"] = MISSING

    rephrase, rephrase_list = _text_list(entry, "rephrase", "rephrase", problems, allow_str=True)
    values["paraphrase_prompts"] = tuple(rephrase)
    before = len(problems)
    locs, loc_list = _text_list(entry, "loc", "loc", problems, allow_str=True)
    loc_answers, ans_list = _text_list(entry, "loc_ans", "loc_ans", problems, allow_str=True)
    values["neighborhood"] = (
        _pair_locality(locs, loc_answers, "loc", "loc_ans", problems) if len(problems) == before else ()
    )
    values["metadata"] = _scalar_extras(
        entry, ("case_id", "id", "subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans")
    )

    def rename(field: str) -> str:
        if field == "prompt":
            return "src"
        if field == "target_new":
            return "alt"
        if field == "ground_truth":
            return "answers[0]" if isinstance(answers, list) else "answers"
        hit = _indexed(field, "paraphrase_prompts")
        if hit is not None:
            return _list_name("rephrase", hit[0], rephrase_list)
        hit = _indexed(field, "neighborhood")
        if hit is not None:
            index, rest = hit
            return _list_name("loc_ans", index, ans_list) if rest == ".answer" else _list_name("loc", index, loc_list)
        return field

    return values, problems, rename


def _pair_locality(
    prompts: list[Any], answers: list[Any], prompt_key: str, answer_key: str, problems: list[CaseProblem]
) -> tuple[NeighborhoodPrompt, ...]:
    if prompts and not answers:
        problems.append(
            CaseProblem(answer_key, f"is missing, but {prompt_key!r} has {len(prompts)} prompt(s) to answer")
        )
        return ()
    if answers and not prompts:
        problems.append(CaseProblem(prompt_key, f"is missing, but {answer_key!r} has {len(answers)} answer(s)"))
        return ()
    if len(answers) == 1 and len(prompts) > 1:
        # One answer for several locality prompts is a common shorthand; it applies to each.
        answers = answers * len(prompts)
    if len(prompts) != len(answers):
        problems.append(
            CaseProblem(
                answer_key,
                f"has {len(answers)} answer(s) for {len(prompts)} prompt(s) in {prompt_key!r}; they must pair up",
            )
        )
        return ()
    return tuple(NeighborhoodPrompt(prompt=p, answer=_target(a)) for p, a in zip(prompts, answers))


def _convert_easyedit(entry: Mapping[str, Any], default_id: str) -> Converted:
    problems: list[CaseProblem] = []
    values: dict[str, Any] = {}
    values["case_id"], id_problems = coerce_case_id(entry.get("case_id", entry.get("id")), default_id)
    problems += id_problems
    subject = _text(entry, "subject", "subject", problems)
    full = _text(entry, "prompt", "prompt", problems)
    values["subject"] = subject
    values["prompt"] = _template_from_full_text(full, subject, "prompt", problems)
    values["target_new"] = _target(_text(entry, "target_new", "target_new", problems))

    truth = entry.get("ground_truth", MISSING)
    truth_name = "ground_truth"
    if truth is MISSING:
        problems.append(CaseProblem("ground_truth", "is missing"))
    elif isinstance(truth, list) and truth and isinstance(truth[0], str):
        # EasyEdit allows several acceptable answers; the first is the one scored.
        truth, truth_name = truth[0], "ground_truth[0]"
    elif not isinstance(truth, str):
        problems.append(
            CaseProblem("ground_truth", f"must be a string or a list of strings, got {type(truth).__name__}")
        )
        truth = MISSING
    values["ground_truth"] = _target(truth)

    rephrase, rephrase_list = _text_list(entry, "rephrase_prompt", "rephrase_prompt", problems, allow_str=True)
    values["paraphrase_prompts"] = tuple(rephrase)
    before = len(problems)
    locs, loc_list = _text_list(entry, "locality_prompt", "locality_prompt", problems, allow_str=True)
    loc_answers, ans_list = _text_list(
        entry, "locality_ground_truth", "locality_ground_truth", problems, allow_str=True
    )
    values["neighborhood"] = (
        _pair_locality(locs, loc_answers, "locality_prompt", "locality_ground_truth", problems)
        if len(problems) == before
        else ()
    )
    values["metadata"] = _scalar_extras(
        entry,
        (
            "case_id",
            "id",
            "prompt",
            "subject",
            "target_new",
            "ground_truth",
            "rephrase_prompt",
            "locality_prompt",
            "locality_ground_truth",
        ),
    )

    def rename(field: str) -> str:
        if field == "ground_truth":
            return truth_name
        hit = _indexed(field, "paraphrase_prompts")
        if hit is not None:
            return _list_name("rephrase_prompt", hit[0], rephrase_list)
        hit = _indexed(field, "neighborhood")
        if hit is not None:
            index, rest = hit
            if rest == ".answer":
                return _list_name("locality_ground_truth", index, ans_list)
            return _list_name("locality_prompt", index, loc_list)
        return field

    return values, problems, rename


def _convert_canonical(entry: Mapping[str, Any], default_id: str) -> Converted:
    values, problems = canonical_entry_values(entry, default_id=default_id)
    return values, problems, lambda field: field


CONVERTERS: Mapping[str, Callable[[Mapping[str, Any], str], Converted]] = {
    COUNTERFACT: _convert_counterfact,
    ZSRE: _convert_zsre,
    EASYEDIT: _convert_easyedit,
    CANONICAL: _convert_canonical,
}
KNOWN_FORMATS = tuple(CONVERTERS)


def entry_to_case(
    entry: Mapping[str, Any], fmt: str, *, default_id: str
) -> tuple[EditCase | None, list[CaseProblem]]:
    """Convert one entry of a known format; problems name fields as that format spells them."""
    values, problems, rename = CONVERTERS[fmt](entry, default_id)
    case, found = assemble_case(values, problems)
    renamed: list[CaseProblem] = []
    seen: set[tuple[str, str]] = set()
    for problem in found:
        name = rename(problem.field)
        # CounterFact's target_true answers every neighborhood prompt: report its problem once.
        if (name, problem.message) in seen:
            continue
        seen.add((name, problem.message))
        renamed.append(CaseProblem(name, problem.message))
    case_id = values.get("case_id")
    if isinstance(case_id, str):
        renamed = [p.located(case_id=case_id) for p in renamed]
    return case, renamed

