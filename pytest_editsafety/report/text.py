"""Text for the markdown report: escaping what users control, numbers formatted once, github tables.

Every section module renders through these, so a case's text is escaped the same way everywhere and tabulate never
re-parses a number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from tabulate import tabulate

from pytest_editsafety.bounds import format_number

__all__ = ["DASH", "escape_md", "markdown_table", "number_text", "percent_text", "ratio_text"]

DASH = "—"

# ---------------------------------------------------------------------------------------------------
# Escaping

# Line and paragraph separators would end a table row; other control characters have no business in a report.
_LINE_BREAKS = re.compile(r"\r\n|[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
# bidi controls and invisible characters: kept visible as (U+XXXX), so a subject cannot reorder or hide the
# text a reviewer reads (an RTL override turns "gpj.exe" into what looks like "exe.jpg")
_INVISIBLE = re.compile("[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
# Markdown that would change the rendering: emphasis, code spans, links/images, headings, table cells,
# strikethrough, GitHub math. The backslash itself first, so escapes we add are not escaped again.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~$])")


def escape_md(text: str) -> str:
    """``text`` as inert inline markdown, safe inside a table cell.

    Line breaks and tabs become spaces and control characters go; bidi controls and invisible characters are
    shown as ``(U+XXXX)``; ``&``, ``<`` and ``>`` become HTML
    entities, so no tag (``<script>``, ``<img onerror=...>``) or autolink survives; markdown punctuation
    (``\\ ` * _ [ ] # | ~ $``) is backslash-escaped, which GitHub renders as the literal character.
    """
    text = _LINE_BREAKS.sub(" ", str(text))
    text = _CONTROL.sub("", text)
    text = _INVISIBLE.sub(lambda m: f"(U+{ord(m.group()):04X})", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


# ---------------------------------------------------------------------------------------------------
# Number formatting (tables get strings only, so tabulate cannot reformat them)


def number_text(x: float | None) -> str:
    return DASH if x is None else format_number(x)


def ratio_text(x: float | None) -> str:
    if x is None:
        return DASH
    return f"{format_number(x)}x" if math.isfinite(x) else format_number(x)


def percent_text(x: float | None) -> str:
    return DASH if x is None else f"{format_number(100.0 * x)} %"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    return tabulate(list(rows), headers=list(headers), tablefmt="github", disable_numparse=True)
