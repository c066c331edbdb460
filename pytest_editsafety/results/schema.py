"""Typed records to and from plain JSON values, driven by the records' own field annotations.

A ``Record`` is a frozen dataclass whose field annotations are the schema: construction checks every
field against its annotation and stores a private canonical copy (tuples, key-sorted dicts, floats), and
``to_dict``/``from_dict`` convert to and from the JSON form. Annotations it understands: ``str``, ``bool``,
``int`` (a count, so ``>= 0``), ``float``, ``X | None``, ``tuple[X, ...]``, ``Mapping[str, X]``, ``Any``
(passed through for the record itself to check), ``JsonValue`` (a plain JSON value kept exactly as written) and
another record type.

Numbers. JSON has no NaN or infinity, and a collapsed model produces both, so every float is a JSON number
when finite and one of the strings ``"nan"``, ``"inf"``, ``"-inf"`` otherwise.

Fields added to a schema version after its first files were written are *optional*: declared with a default and
``metadata={OPTIONAL: True}``, left out of the JSON while they hold their default (so a run that does not use them
writes the same file as before) and read as the default from a file that lacks them (so older files still read).
A reader older than the field refuses a file that carries it (an unknown field), rather than drop what it says.

Errors name the path of the bad value: ``RecordError("metrics.ppl_ratio", ...)`` from a constructor,
``ResultsFormatError(source, "$.cases[3].metrics.ppl_ratio", ...)`` from ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union

from pytest_editsafety.results.errors import RecordError, ResultsFormatError

__all__ = ["OPTIONAL", "READABLE_SCHEMAS", "SCHEMA", "SCHEMA_V1", "JsonValue", "Record", "decode_float",
           "describe_json", "encode_float"]

# v2 added the plan, the sessions and the coverage, and each record's worker and device; v1 files are still read
# (their coverage is unknown, and where their tests ran)
SCHEMA = "pytest-editsafety/v2"
SCHEMA_V1 = "pytest-editsafety/v1"
READABLE_SCHEMAS = (SCHEMA_V1, SCHEMA)

# dataclasses.field(metadata=...) key of an optional field (see the module's docstring)
OPTIONAL = "editsafety_optional"

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

R = TypeVar("R", bound="Record")


def encode_float(x: float) -> float | str:
    """A float as JSON can hold it: the number itself, or ``"nan"``/``"inf"``/``"-inf"``."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_float(value: Any) -> float:
    """Inverse of ``encode_float``; raises ``ValueError`` for anything else (bools included)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {json.dumps(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    raise ValueError(f"expected a number (or \"nan\", \"inf\", \"-inf\"), got {json.dumps(value)[:60]}")


def describe_json(value: Any) -> str:
    """A JSON value for an error message, cut to 60 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Invalid(Exception):
    """A value that does not fit its annotation, at ``path``; the public entry points turn it into a
    ``RecordError`` or a ``ResultsFormatError``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _got(value: Any, from_json: bool) -> str:
    return describe_json(value) if from_json else f"{type(value).__name__} {value!r:.60}"


# --------------------------------------------------------------------------------------------------
# One codec per kind of annotation. ``check`` takes the JSON form (``from_json``) or a Python value and
# returns the canonical Python value; ``encode`` turns a canonical value into its JSON form.


@dataclasses.dataclass(frozen=True)
class _Leaf:
    accepts: Callable[[Any], bool]
    expected: str

    def check(self, value: Any, path: str, from_json: bool) -> Any:
        if not self.accepts(value):
            raise _Invalid(path, f"expected {self.expected}, got {_got(value, from_json)}")
        return value

    def encode(self, value: Any) -> Any:
        return value


class _Float:
    def check(self, value: Any, path: str, from_json: bool) -> float:
        if from_json:
            try:
                return decode_float(value)
            except ValueError as err:
                raise _Invalid(path, str(err)) from None
        if not _is_number(value):
            raise _Invalid(path, f"expected a number, got {_got(value, from_json=False)}")
        return float(value)

    def encode(self, value: float) -> float | str:
        return encode_float(value)


class JsonValue:
    """Annotation of a plain JSON value written and read back exactly as it is (an integer stays an integer, a
    list a list): settings such as hyper-parameters, whose hash is taken over the values as given. NaN and infinity
    are refused, since a plain JSON value cannot hold them."""


class _Json:
    def check(self, value: Any, path: str, from_json: bool) -> Any:
        try:
            return json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise _Invalid(path, f"expected a plain JSON value, got {_got(value, from_json)} ({err})") from None

    def encode(self, value: Any) -> Any:
        return value


class _Any:
    """A value the record checks itself (the bounds); numbers in it are written like every other float."""

    def check(self, value: Any, path: str, from_json: bool) -> Any:
        return value

    def encode(self, value: Any) -> Any:
        return encode_float(value) if _is_number(value) else value


@dataclasses.dataclass(frozen=True)
class _Optional:
    inner: _Codec

    def check(self, value: Any, path: str, from_json: bool) -> Any:
        return None if value is None else self.inner.check(value, path, from_json)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


@dataclasses.dataclass(frozen=True)
class _Tuple:
    item: _Codec

    def check(self, value: Any, path: str, from_json: bool) -> tuple[Any, ...]:
        if not isinstance(value, list if from_json else (list, tuple)):
            raise _Invalid(path, f"expected a list, got {_got(value, from_json)}")
        return tuple(self.item.check(v, f"{path}[{i}]", from_json) for i, v in enumerate(value))

    def encode(self, value: tuple[Any, ...]) -> list[Any]:
        return [self.item.encode(v) for v in value]


@dataclasses.dataclass(frozen=True)
class _Map:
    item: _Codec

    def check(self, value: Any, path: str, from_json: bool) -> dict[str, Any]:
        if not isinstance(value, dict if from_json else Mapping):
            raise _Invalid(path, f"expected an object, got {_got(value, from_json)}")
        for key in value:
            if not isinstance(key, str):
                raise _Invalid(path, f"expected an object with string keys, got key {key!r:.60}")
        # checked in the caller's order, so the first bad entry of a file is the one reported
        checked = {k: self.item.check(v, f"{path}.{k}", from_json) for k, v in value.items()}
        return {k: checked[k] for k in sorted(checked)}

    def encode(self, value: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self.item.encode(v) for k, v in value.items()}


@dataclasses.dataclass(frozen=True)
class _Nested:
    cls: type[Record]

    def check(self, value: Any, path: str, from_json: bool) -> Record:
        if from_json:
            return _build(self.cls, value, path)
        if not isinstance(value, self.cls):
            raise _Invalid(path, f"expected a {self.cls.__name__}, got {type(value).__name__}")
        return value

    def encode(self, value: Record) -> dict[str, Any]:
        return value.to_dict()


_Codec = Union[_Leaf, _Float, _Json, _Any, _Optional, _Tuple, _Map, _Nested]

_SCALARS: Mapping[Any, _Codec] = {
    str: _Leaf(lambda v: isinstance(v, str), "a string"),
    bool: _Leaf(lambda v: isinstance(v, bool), "true or false"),
    int: _Leaf(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    float: _Float(),
    Any: _Any(),
    JsonValue: _Json(),
}


def _codec(hint: Any) -> _Codec:
    if hint in _SCALARS:
        return _SCALARS[hint]
    if isinstance(hint, type) and issubclass(hint, Record):
        return _Nested(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _Optional(_codec(args[0] if args[1] is type(None) else args[1]))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Tuple(_codec(args[0]))
    if origin is Mapping and args[0] is str:
        return _Map(_codec(args[1]))
    raise TypeError(f"a record field cannot be annotated {hint!r}: it has no JSON form here")


@functools.cache
def _fields(cls: type[Record]) -> Mapping[str, _Codec]:
    hints = typing.get_type_hints(cls)
    return {f.name: _codec(hints[f.name]) for f in dataclasses.fields(cls)}


def _build(cls: type[R], data: Any, path: str) -> R:
    if not isinstance(data, dict):
        raise _Invalid(path, f"expected an object, got {describe_json(data)}")
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Invalid(f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(fields)})")
    optional = _optional_fields(cls)
    missing = [name for name in fields if name not in data and name not in optional]
    if missing:
        raise _Invalid(path, f"missing field(s) {', '.join(map(repr, missing))}")
    values = {name: codec.check(data[name], f"{path}.{name}", True) for name, codec in fields.items() if name in data}
    try:
        return cls(**values)
    except RecordError as err:
        raise _Invalid(f"{path}.{err.field}", err.problem) from None


@functools.cache
def _optional_fields(cls: type[Record]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(OPTIONAL))


def _default(cls: type[Record], name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


class Record:
    """Base of the frozen dataclasses that make up a results file.

    Subclasses put their invariants across fields in ``_validate``, raising ``RecordError`` with the field.
    """

    def __post_init__(self) -> None:
        for name, codec in _fields(type(self)).items():
            try:
                value = codec.check(getattr(self, name), name, False)
            except _Invalid as err:
                raise RecordError(err.path, err.problem) from None
            # a private copy, so a caller mutating its dict or list later cannot change the record
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain form (non-finite floats as strings): what travels on an xdist test report."""
        cls = type(self)
        optional = _optional_fields(cls)
        return {name: codec.encode(getattr(self, name)) for name, codec in _fields(cls).items()
                if name not in optional or getattr(self, name) != _default(cls, name)}

    @classmethod
    def from_dict(cls: type[R], data: Any, *, source: str = "<record>", path: str = "$") -> R:
        """Inverse of ``to_dict``; errors name ``source`` and the JSON path (``$.metrics.ppl_ratio``), below
        ``path`` when the record is part of a larger document."""
        try:
            return _build(cls, data, path)
        except _Invalid as err:
            raise ResultsFormatError(source, err.path, err.problem) from None
