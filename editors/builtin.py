"""Factories of the built-in editors, registered as entry points in the group ``editsafety.editors`` of this
distribution's metadata exactly as a third-party editor registers its own (see :mod:`editors.registry`).

Each takes the editor's hyper-parameters as a mapping (layers resolved) and returns a new editor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from editors.hparams import hparams_from_mapping


def _rome(name: str, hparams: Mapping[str, Any], *, consistent: bool, test_prefix: bool = False):
    from editors.rome import RomeEditor, RomeHparams

    hp = hparams_from_mapping(RomeHparams, hparams, source=f"{name} hparams")
    return RomeEditor(name, hp, consistent=consistent, test_prefix=test_prefix)


def make_rome(hparams: Mapping[str, Any]):
    """Original ROME: the update keyed on the bare prompt's key ``kᵘ``."""
    return _rome("rome", hparams, consistent=False)


def make_c_rome(hparams: Mapping[str, Any]):
    """C-ROME: consistent keys, the mean key ``k̄`` over the context templates everywhere."""
    return _rome("c-rome", hparams, consistent=True)


def make_c_rome_prefix(hparams: Mapping[str, Any]):
    """C-ROME plus the papers' test-time prefix on hard cases' prompts."""
    return _rome("c-rome-prefix", hparams, consistent=True, test_prefix=True)


def make_memit(hparams: Mapping[str, Any]):
    from editors.memit import MemitEditor, MemitHparams

    return MemitEditor(hparams_from_mapping(MemitHparams, hparams, source="memit hparams"))


def make_ft_linf(hparams: Mapping[str, Any]):
    from editors.ft import FtHparams, FtLinfEditor

    return FtLinfEditor(hparams_from_mapping(FtHparams, hparams, source="ft-linf hparams"))


def make_mend(hparams: Mapping[str, Any]):
    from editors.mend import MendEditor, MendHparams

    return MendEditor(hparams_from_mapping(MendHparams, hparams, source="mend hparams"))


def make_r_rome(hparams: Mapping[str, Any]):
    """r-ROME (Gupta et al. 2024, "Rebuilding ROME"): a name for ``c-rome`` with the papers' value anchor.

    r-ROME maps the mean key to the bare prompt's MLP output plus δ (its compute_v.py:169-209), which is C-ROME's
    ``c_rome_target="bare"``; it keeps files of its own because its authors' configs differ from the collapse
    papers' (``mom2_adjustment`` on). ``tests/test_new_editors.py`` pins that the two edit identically.
    """
    from editors.rome import RomeHparams

    hp = hparams_from_mapping(RomeHparams, hparams, source="r-rome hparams")
    if hp.c_rome_target != "bare":
        raise ValueError(f"r-rome hparams: c_rome_target is r-ROME's value anchor, 'bare'; got {hp.c_rome_target!r} "
                         f"(use c-rome for the other anchor)")
    return _rome("r-rome", hparams, consistent=True)


def make_emmet(hparams: Mapping[str, Any]):
    """EMMET (Gupta et al. 2024): batched ROME with equality constraints over MEMIT's residual spread."""
    from editors.emmet import EmmetEditor, EmmetHparams

    return EmmetEditor(hparams_from_mapping(EmmetHparams, hparams, source="emmet hparams"))


def make_alphaedit(hparams: Mapping[str, Any]):
    """AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of preserved keys."""
    from editors.alphaedit import AlphaEditEditor, AlphaEditHparams

    return AlphaEditEditor(hparams_from_mapping(AlphaEditHparams, hparams, source="alphaedit hparams"))
