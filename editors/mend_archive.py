"""A trained MEND network on disk: ``mend.safetensors`` (tensors only) plus ``mend.json`` (everything else).

Loading reads JSON and safetensors and nothing else, so an archive from anywhere cannot run code (the
reference implementation pickles whole modules with ``torch.save``). An archive edits exactly one model:
``mend.json`` records the identity of the weights it was trained on (the model registry's identity: the
organism's recipe hash, ``repo@commit`` for a Hugging Face model, a file hash for a local directory) and
the names and shapes of the weights it edits; loading it for anything else is refused with an error that
says how to train one. The tensors' sha256 is recorded too, so a truncated or swapped file is caught.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from editors.mend import MendHparams, MendNetwork, MendTarget, edit_targets

__all__ = [
    "ARCHIVE_FORMAT",
    "CONFIG_FILE",
    "TENSORS_FILE",
    "MendArchiveError",
    "MendArchiveMismatchError",
    "default_identity",
    "load_archive",
    "read_config",
    "save_archive",
]

ARCHIVE_FORMAT = "pytest-editsafety/mend-archive/1"
CONFIG_FILE = "mend.json"
TENSORS_FILE = "mend.safetensors"


class MendArchiveError(ValueError):
    """An archive that cannot be read: missing, malformed, or its tensors do not match its config."""


class MendArchiveMismatchError(MendArchiveError):
    """An archive trained for another model, or for other weights than the hyper-parameters name."""


def train_command(model_hint: str) -> str:
    return f"python -m pytest_editsafety mend train --model {model_hint} --cases FILE"


def default_identity(model) -> str:
    """The identity of ``model`` when no registry identity is at hand: an organism's recipe hash, else the
    Hugging Face name and commit its config carries (what the registry reports for a hub model)."""
    config = model.config
    recipe_hash = getattr(config, "editsafety_recipe_hash", None)
    if recipe_hash:
        return str(recipe_hash)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    commit = getattr(config, "_commit_hash", None)
    return f"{name}@{commit or 'unpinned'}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_archive(directory: Path, network: MendNetwork, *, identity: str, model, family, hparams: MendHparams,
                 data: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``network`` and its config into ``directory`` (created if needed); returns the config."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in network.state_dict().items()}
    save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": ARCHIVE_FORMAT})
    config = {
        "format": ARCHIVE_FORMAT,
        "model": {"identity": identity, "model_type": getattr(model.config, "model_type", None),
                  "family": family.name},
        "targets": [t.to_dict() for t in network.targets],
        "network": {"rank": network.rank, "n_hidden": network.n_hidden},
        "hparams": hparams.network_key(),
        "data": dict(data),
        "training": dict(training),
        "tensors_sha256": _file_sha256(directory / TENSORS_FILE),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return config


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MendArchiveError(f"{directory}: not a MEND archive (no {CONFIG_FILE}); make one with "
                               f"{train_command('MODEL')}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MendArchiveError(f"{path}: unreadable: {err}") from err
    if not isinstance(config, dict) or config.get("format") != ARCHIVE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise MendArchiveError(f"{path}: format {found!r}, expected {ARCHIVE_FORMAT!r}")
    return config


def _check_model(path: Path, config: Mapping[str, Any], identity: str, expected: tuple[MendTarget, ...]) -> None:
    archived = config.get("model", {})
    if archived.get("identity") != identity:
        raise MendArchiveMismatchError(
            f"MEND archive {path} was trained for model {archived.get('identity')!r} "
            f"({archived.get('model_type')}), not for this model ({identity!r}); a MEND network only edits the "
            f"weights it was trained on: train one for this model with {train_command('<this model>')}"
        )
    found = [(t.get("name"), t.get("d_out"), t.get("d_in")) for t in config.get("targets", [])]
    wanted = [(t.name, t.d_out, t.d_in) for t in expected]
    if found != wanted:
        raise MendArchiveMismatchError(
            f"MEND archive {path} edits {found}, but the hyper-parameters (layers, modules) name {wanted} on this "
            "model; use the archive's layers and modules or train another"
        )


def load_archive(directory: Path, model, family, hparams: MendHparams, *, identity: str) -> MendNetwork:
    """The network in ``directory``, checked against ``model`` (``identity``) and ``hparams``' weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    _check_model(directory, config, identity, edit_targets(model, family, hparams.layers, hparams.modules))
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise MendArchiveError(f"{directory}: {TENSORS_FILE} is missing")
    if _file_sha256(tensors_path) != config.get("tensors_sha256"):
        raise MendArchiveError(f"{tensors_path}: sha256 differs from the one in {CONFIG_FILE}; the archive was "
                               "modified or is incomplete")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as err:
        raise MendArchiveError(f"{tensors_path}: unreadable: {err}") from err
    targets = tuple(MendTarget(name=t["name"], module=t["name"].removesuffix(".weight"), layer=t["layer"],
                               kind=t["kind"], d_out=t["d_out"], d_in=t["d_in"], transposed=t["transposed"],
                               group=t["group"], mode=t["mode"]) for t in config["targets"])
    shape = config["network"]
    network = MendNetwork(targets, rank=int(shape["rank"]), n_hidden=int(shape["n_hidden"]), edit_lr=0.0)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise MendArchiveError(f"{tensors_path}: tensors do not match the network in {CONFIG_FILE}: {err}") from err
    network.requires_grad_(False)
    return network.eval()
