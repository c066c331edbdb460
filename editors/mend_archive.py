"""A trained MEND network on disk: ``mend.safetensors`` (tensors only) plus ``mend.json`` (everything else).

Loading reads JSON and safetensors and nothing else, so an archive from anywhere cannot run code (the
reference implementation pickles whole modules with ``torch.save``). An archive edits exactly one model:
``mend.json`` records the identity of the weights it was trained on (the model registry's identity: the
organism's recipe hash, ``repo@commit`` for a Hugging Face model, a file hash for a local directory) and
the names and shapes of the weights it edits; loading it for anything else is refused with an error that
says how to train one. The tensors' sha256 is recorded too, so a truncated or swapped file is caught, and
so is the dtype the model ran at while the network was trained (its gradients, and so the network, differ
between float32 and bfloat16). A malformed ``mend.json`` is an error naming the file and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from editors.mend_network import MendHparams, MendNetwork, MendTarget, edit_targets
from editors.storage import file_sha256

log = logging.getLogger(__name__)

__all__ = [
    "ARCHIVE_FORMAT",
    "CONFIG_FILE",
    "TENSORS_FILE",
    "MendArchiveError",
    "MendArchiveMismatchError",
    "default_identity",
    "load_archive",
    "model_dtype",
    "open_archive",
    "read_config",
    "save_archive",
]

# /2: mend.json records the model dtype the network was trained at
ARCHIVE_FORMAT = "pytest-editsafety/mend-archive/2"
CONFIG_FILE = "mend.json"
TENSORS_FILE = "mend.safetensors"


class MendArchiveError(ValueError):
    """An archive that cannot be read: missing, malformed, or its tensors do not match its config."""


class MendArchiveMismatchError(MendArchiveError):
    """An archive trained for another model, or for other weights than the hyper-parameters name."""


def default_identity(model) -> str:
    """The identity of ``model`` when its caller provides none: the Hugging Face name and commit its config
    carries (what the registry reports for a hub model). Callers that know better (the harness: an organism's
    recipe hash, a local directory's file hash) pass ``Provided.identity``."""
    config = model.config
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    commit = getattr(config, "_commit_hash", None)
    return f"{name}@{commit or 'unpinned'}"


def model_dtype(model) -> str:
    """The dtype ``model`` computes in, as recorded in archives and their cache key (``torch.float32``)."""
    return str(next(model.parameters()).dtype)


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
                  "family": family.name, "dtype": model_dtype(model)},
        "targets": [t.to_dict() for t in network.targets],
        "network": {"rank": network.rank, "n_hidden": network.n_hidden},
        "hparams": hparams.network_key(),
        "data": dict(data),
        "training": dict(training),
        "tensors_sha256": file_sha256(directory / TENSORS_FILE),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return config


def read_config(directory: Path) -> dict[str, Any]:
    """``mend.json`` of the archive in ``directory``, its structure checked (every field loading reads)."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MendArchiveError(f"{directory}: not a MEND archive (no {CONFIG_FILE}); make one with "
                               f"editsafety train --editor mend --model MODEL --cases FILE") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MendArchiveError(f"{path}: unreadable: {err}") from err
    if not isinstance(config, dict) or config.get("format") != ARCHIVE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise MendArchiveError(f"{path}: format {found!r}, expected {ARCHIVE_FORMAT!r}")
    _check_structure(path, config)
    return config


# what each field of mend.json must hold; "int" excludes booleans (JSON true is no layer index)
_MODEL_FIELDS = {"identity": "str", "family": "str", "dtype": "str"}
_TARGET_FIELDS = {"name": "str", "layer": "int", "kind": "str", "d_out": "int", "d_in": "int",
                  "transposed": "bool", "group": "str", "mode": "int"}
_NETWORK_FIELDS = {"rank": "int", "n_hidden": "int"}
_KINDS = {"str": (str, "a string"), "int": (int, "an integer"), "bool": (bool, "true or false"),
          "object": (dict, "an object"), "list": (list, "a list")}


def _field(path: Path, parent: Mapping[str, Any], key: str, kind: str, where: str) -> Any:
    """``parent[key]``, checked to be a ``kind``; else an error naming the file and the field (``where``)."""
    if key not in parent:
        raise MendArchiveError(f"{path}: field {where} is missing")
    value = parent[key]
    cls, described = _KINDS[kind]
    if (kind == "int" and isinstance(value, bool)) or not isinstance(value, cls):
        raise MendArchiveError(f"{path}: field {where} must be {described}, got {json.dumps(value)[:80]}")
    return value


def _check_structure(path: Path, config: Mapping[str, Any]) -> None:
    model = _field(path, config, "model", "object", "model")
    for key, kind in _MODEL_FIELDS.items():
        _field(path, model, key, kind, f"model.{key}")
    targets = _field(path, config, "targets", "list", "targets")
    if not targets:
        raise MendArchiveError(f"{path}: field targets is empty")
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise MendArchiveError(f"{path}: field targets[{i}] must be an object, got {type(target).__name__}")
        for key, kind in _TARGET_FIELDS.items():
            _field(path, target, key, kind, f"targets[{i}].{key}")
    network = _field(path, config, "network", "object", "network")
    for key, kind in _NETWORK_FIELDS.items():
        _field(path, network, key, kind, f"network.{key}")
    _field(path, config, "tensors_sha256", "str", "tensors_sha256")
    for key in ("data", "training"):
        _field(path, config, key, "object", key)


def _check_model(path: Path, config: Mapping[str, Any], identity: str, expected: tuple[MendTarget, ...]) -> None:
    archived = config["model"]
    if archived["identity"] != identity:
        raise MendArchiveMismatchError(
            f"MEND archive {path} was trained for model {archived['identity']!r} "
            f"({archived.get('model_type')}), not for this model ({identity!r}); a MEND network only edits the "
            f"weights it was trained on: train one for this model with `editsafety train --editor mend --model <this model> --cases FILE`"
        )
    found = [(t["name"], t["d_out"], t["d_in"]) for t in config["targets"]]
    wanted = [(t.name, t.d_out, t.d_in) for t in expected]
    if found != wanted:
        raise MendArchiveMismatchError(
            f"MEND archive {path} edits {found}, but the hyper-parameters (layers, modules) name {wanted} on this "
            "model; use the archive's layers and modules or train another"
        )


def load_archive(directory: Path, model, family, hparams: MendHparams, *, identity: str) -> MendNetwork:
    """The network in ``directory``, checked against ``model`` (``identity``) and ``hparams``' weights."""
    return open_archive(directory, model, family, hparams, identity=identity)[0]


def open_archive(directory: Path, model, family, hparams: MendHparams, *, identity: str
                 ) -> tuple[MendNetwork, dict[str, Any]]:
    """:func:`load_archive`, plus the ``mend.json`` it was checked against (what a certificate records)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    _check_model(directory, config, identity, edit_targets(model, family, hparams.layers, hparams.modules))
    if config["model"]["dtype"] != model_dtype(model):
        log.warning("MEND archive %s was trained with the model in %s; it now edits it in %s", directory,
                    config["model"]["dtype"], model_dtype(model))
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise MendArchiveError(f"{directory}: {TENSORS_FILE} is missing")
    if file_sha256(tensors_path) != config["tensors_sha256"]:
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
    try:
        network = MendNetwork(targets, rank=shape["rank"], n_hidden=shape["n_hidden"], edit_lr=0.0)
        network.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise MendArchiveError(f"{tensors_path}: tensors do not match the network in {CONFIG_FILE}: {err}") from err
    for name, tensor in network.state_dict().items():
        # NaN statistics or weights would write NaN into the model at the first edit
        if not bool(torch.isfinite(tensor).all()):
            raise MendArchiveError(f"{tensors_path}: tensor {name} holds non-finite values")
    network.requires_grad_(False)
    return network.eval(), config
