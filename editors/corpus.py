"""A text corpus as the editors and the harness pass it around: texts, where each came from, and a hash.

Second-moment statistics are keyed by the corpus's name and hash; perplexity is measured over its texts. The
loaders (ME-PPL files, the organisms' generated corpora) live in the plugin's corpora module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Corpus"]


@dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]
    sources: tuple[str, ...]
    sha256: str

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.sources):
            raise ValueError(
                f"corpus {self.name!r}: {len(self.texts)} texts but {len(self.sources)} sources"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_texts(cls, name: str, texts: Sequence[str], sources: Sequence[str] | None = None) -> Corpus:
        """A corpus built in-process; its hash covers texts and sources, encoded unambiguously."""
        texts = tuple(texts)
        sources = tuple(sources) if sources is not None else (name,) * len(texts)
        # JSON, not a plain join: ("a\nb",) and ("a", "b") must not hash alike.
        blob = json.dumps([list(texts), list(sources)], ensure_ascii=False, separators=(",", ":"))
        return cls(name=name, texts=texts, sources=sources, sha256=hashlib.sha256(blob.encode()).hexdigest())
