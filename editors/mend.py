"""MEND (Mitchell et al. 2022): a trained hypernetwork turns one fine-tuning gradient into a weight update.

An edit runs the model once on ``prompt + " " + target_new`` (teacher forced, the loss being the target
tokens' mean NLL), reads the gradient's rank-one factors of every edited weight with hooks (the layer input
``u_t`` and the gradient at its output ``δ_t``, per token), maps them through the editor network and adds
``ΔW = −α Σ_t δ̃_t ũ_tᵀ`` to the weight in place (:mod:`editors.maths.mend`). No optimisation at edit time:
everything MEND knows is in its trained network, an *archive* (safetensors tensors plus a JSON config) made
by the ``editsafety train --editor mend`` command (:mod:`editors.mend_train`, :mod:`editors.mend_archive`), or
built on first use for the model organisms.

The edited weights are the MLP matrices of the last layers (``layers`` × ``modules``); ``modules`` holds
family kinds (``mlp_in``, ``mlp_out``: GPT-2 ``c_fc``/``c_proj``, GPT-J ``fc_in``/``fc_out``, Llama
``up_proj``/``down_proj``) or names inside the layer's MLP module (Llama's ``gate_proj``). Weights of one
shape share one network (the paper's ``shared`` setting), each with its own mode (scale and shift) and step
size.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import torch

from editors.base import EditorBase, EditOutcome, EditRequest, Needs, Provided, TrainedNetworkNeed, TrainingJob
from editors.ft import target_batch, target_nll
from editors.hooks import frozen
from editors.maths import delta_to_storage
from editors.mend_network import MendHparams, MendNetwork, edit_targets, gradient_factors, plain_key

log = logging.getLogger(__name__)

__all__ = ["TRAIN_HINT", "MendEditor", "MendHparams", "train_network"]


TRAIN_HINT = ("train one with `editsafety train --editor mend --model MODEL --cases FILE [--hparams HPARAMS.json] "
              "[--dtype DTYPE]`, or point the 'archive' hyper-parameter at an archive directory")


def train_network(hparams: MendHparams, job: TrainingJob) -> dict[str, Any]:
    """Train a MEND network for ``job.model`` on ``job.cases`` and write its archive into ``job.directory``;
    returns the training report (steps, seconds, first and last losses)."""
    from editors.mend_archive import save_archive
    from editors.mend_train import train_mend

    network, report = train_mend(job.model, job.tokenizer, job.family, hparams, job.cases, progress=job.progress,
                                 description=f"training MEND for {job.identity}")
    save_archive(job.directory, network, identity=job.identity, model=job.model, family=job.family,
                 hparams=hparams, data=job.data, training=report)
    return dict(report)


class MendEditor(EditorBase):
    """``mend``: one gradient, transformed by a trained editor network, added to the last MLP layers.

    Needs a network trained for the model and these hyper-parameters (unless ``archive`` names one); set it up
    with :func:`editors.provision.set_up` before the first edit."""

    def __init__(self, hparams: MendHparams, *, name: str = "mend", network: MendNetwork | None = None):
        self.name = name
        self.hparams = hparams
        self.network = network
        self.archive_path: Path | None = None
        self._provenance: dict[str, str] = {}

    def needs(self, model, family) -> Needs:
        if self.hparams.archive or self.network is not None:  # a network in hand, or a path to one
            return Needs()
        hp = self.hparams
        return Needs(trained_network=TrainedNetworkNeed(
            kind="mend", key=hp.network_key(), train=functools.partial(train_network, hp),
            n_training_cases=hp.steps * hp.batch_size, seed=hp.seed, train_hint=TRAIN_HINT))

    def setup(self, model, tokenizer, family, provided: Provided) -> None:
        """Load the archive (``archive``, else the provided network) and check it was trained for these
        weights (``provided.identity``, else the identity the model's config implies)."""
        from editors.mend_archive import default_identity, open_archive

        super().setup(model, tokenizer, family, provided)
        path = Path(self.hparams.archive).expanduser() if self.hparams.archive else provided.trained_network
        if path is None and self.network is not None:  # given to the constructor: used as it is
            self.network = self.network.to(next(model.parameters()).device)
            return
        if path is None:
            raise ValueError(f"{self.name}: no trained network was provided; {TRAIN_HINT}")
        identity = provided.identity or default_identity(model)
        network, config = open_archive(path, model, family, self.hparams, identity=identity)
        self.network = network.to(next(model.parameters()).device)
        self.archive_path = path
        self._provenance = {"archive_sha256": config["tensors_sha256"], "archive_dtype": config["model"]["dtype"]}

    def parameters_touched(self, model, family) -> tuple[str, ...]:
        return tuple(t.name for t in edit_targets(model, family, self.hparams.layers, self.hparams.modules))

    def provenance(self) -> dict[str, str]:
        """Which trained network edits (for a certificate's metadata): the sha256 of the archive's tensors and
        the model dtype it was trained at; empty until :meth:`setup` loaded one."""
        return dict(self._provenance)

    def apply(self, model, tokenizer, family, requests: list[EditRequest]) -> EditOutcome:
        if not requests:
            raise ValueError(f"{self.name}: no edit requests")
        if self.network is None:
            raise ValueError(f"{self.name}: set the editor up first (editors.provision.set_up) to load its network")
        network = self.network
        targets = edit_targets(model, family, self.hparams.layers, self.hparams.modules)
        if tuple(t.name for t in targets) != tuple(t.name for t in network.targets):
            raise ValueError(f"{self.name}: the network edits {[t.name for t in network.targets]}, the "
                             f"hyper-parameters name {[t.name for t in targets]}")
        device = next(model.parameters()).device
        batch = target_batch(tokenizer, requests, device)
        with frozen(model):
            factors, nll = gradient_factors(model, family, targets, batch, len(requests))
        diagnostics: dict[str, float | int | str] = {"initial_nll": float(nll.mean()), "n_requests": len(requests)}
        total = 0.0
        with torch.no_grad():
            for index, target in enumerate(targets):
                f = factors[target.name]
                # all requests' tokens in one sum: a batch of edits is one update, as in the reference code
                delta_w = network.update(index, f.u.reshape(-1, target.d_in), f.delta.reshape(-1, target.d_out),
                                         f.mask.reshape(-1))
                weight = family.get_module(model, target.module).weight
                weight.add_(delta_to_storage(delta_w, target.transposed).to(device=weight.device, dtype=weight.dtype))
                fro = float(torch.linalg.matrix_norm(delta_w))
                total += fro * fro
                diagnostics[f"delta_fro_{plain_key(target.kind)}_l{target.layer}"] = fro
            diagnostics["n_tokens"] = int(factors[targets[0].name].mask.sum())
        diagnostics["delta_fro"] = math.sqrt(total)
        diagnostics["final_nll"] = float(sum(target_nll(model, tokenizer, requests)) / len(requests))
        log.debug("%s: %s", self.name, diagnostics)
        return EditOutcome(edited=tuple(t.name for t in targets), diagnostics=diagnostics)
