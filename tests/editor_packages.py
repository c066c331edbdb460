"""Install throwaway editor packages for tests: a module plus a dist-info whose entry points register editors."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

ENTRY_POINT_GROUP = "editsafety.editors"


def _dist_info(root: Path, module: str, editors: Mapping[str, str]) -> None:
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {module}:{factory}\n" for name, factory in editors.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + lines)


def write_editor_package(root: Path, module: str, source: str, editors: Mapping[str, str]) -> Path:
    """Make ``root`` (put it on ``sys.path``) hold ``module`` and register ``editors`` (name -> factory)
    under the ``editsafety.editors`` entry-point group, as an installed distribution would."""
    (root / f"{module}.py").write_text(source)
    _dist_info(root, module, editors)
    return root


def copy_editor_package(root: Path, package: Path, editors: Mapping[str, str]) -> Path:
    """The same for an existing package directory ``package`` (copied into ``root``)."""
    shutil.copytree(package, root / package.name)
    _dist_info(root, package.name, editors)
    return root
