"""Architecture families: where the editable modules live in each supported transformers model.

Editors name modules through a family (``family.layer_name("mlp_out", 5)``) instead of hard-coding
GPT-2 paths, so one editor works on GPT-2, GPT-J, Llama and Mistral. This module imports nothing heavy:
the plugin reads it at startup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "ArchitectureFamily",
    "FAMILIES",
    "LAYER_KINDS",
    "FIXED_KINDS",
    "UnsupportedArchitectureError",
    "family_for_model_type",
    "supported_model_types",
]

# Kinds whose template carries one "{}" for the layer index, and kinds that name one fixed module.
LAYER_KINDS: tuple[str, ...] = ("mlp_out", "mlp_in", "mlp", "block")
FIXED_KINDS: tuple[str, ...] = ("final_norm", "lm_head", "embed")


class UnsupportedArchitectureError(ValueError):
    """A model's ``config.model_type`` is not one of the architectures the project knows how to edit."""


@dataclass(frozen=True)
class ArchitectureFamily:
    name: str
    model_types: tuple[str, ...]
    mlp_out: str
    mlp_in: str
    mlp: str
    block: str
    final_norm: str
    lm_head: str
    embed: str
    n_layers_attr: str
    # GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear's (out, in):
    # a rank-one update must be transposed before it is added.
    weight_transposed: bool
    prepends_bos: bool
    # the block's output is its input plus its attention's and its MLP's outputs, unscaled and unnormalised (GPT-2,
    # Llama, Mistral; GPT-J's parallel block too): a vector added to the MLP's output at a position is the same
    # vector added to the block's output there. v*'s search then runs the edited block once, not at every step
    # (editors.value_search). False for a block that normalises or scales the MLP's output before adding it
    mlp_joins_residual: bool

    def __post_init__(self) -> None:
        for kind in LAYER_KINDS:
            if getattr(self, kind).count("{}") != 1:
                raise ValueError(
                    f"family {self.name!r}: template {kind}={getattr(self, kind)!r} needs exactly one '{{}}'"
                )
        for kind in FIXED_KINDS:
            if "{" in getattr(self, kind):
                raise ValueError(f"family {self.name!r}: {kind}={getattr(self, kind)!r} must not be a template")

    def layer_name(self, kind: str, layer: int | None = None) -> str:
        """Dotted module name of ``kind`` ("mlp_out", "mlp_in", "mlp", "block") at ``layer``.

        Fixed kinds ("final_norm", "lm_head", "embed") take no layer.
        """
        if kind in LAYER_KINDS:
            # bool is an int subclass; True as a layer index is always a caller bug
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise ValueError(f"family {self.name!r}: {kind!r} needs a layer index >= 0, got {layer!r}")
            return getattr(self, kind).format(layer)
        if kind in FIXED_KINDS:
            if layer is not None:
                raise ValueError(f"family {self.name!r}: {kind!r} is not per layer; got layer={layer!r}")
            return getattr(self, kind)
        raise ValueError(
            f"family {self.name!r}: unknown module kind {kind!r}; known: {', '.join(LAYER_KINDS + FIXED_KINDS)}"
        )

    def n_layers(self, config: Any) -> int:
        value = getattr(config, self.n_layers_attr, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"family {self.name!r}: config {type(config).__name__} has no positive integer "
                f"{self.n_layers_attr!r} (got {value!r})"
            )
        return value

    def get_module(self, model: Any, name: str) -> Any:
        """The submodule ``name`` of ``model``, with an error naming the family when it is absent."""
        try:
            return model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"family {self.name!r}: model {type(model).__name__} has no module {name!r}"
            ) from err


_GPT2 = ArchitectureFamily(
    name="gpt2",
    model_types=("gpt2",),
    mlp_out="transformer.h.{}.mlp.c_proj",
    mlp_in="transformer.h.{}.mlp.c_fc",
    mlp="transformer.h.{}.mlp",
    block="transformer.h.{}",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
    n_layers_attr="n_layer",
    weight_transposed=True,
    prepends_bos=False,
    mlp_joins_residual=True,
)

_GPTJ = ArchitectureFamily(
    name="gptj",
    model_types=("gptj",),
    mlp_out="transformer.h.{}.mlp.fc_out",
    mlp_in="transformer.h.{}.mlp.fc_in",
    mlp="transformer.h.{}.mlp",
    block="transformer.h.{}",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
    n_layers_attr="n_layer",
    weight_transposed=False,
    prepends_bos=False,
    mlp_joins_residual=True,
)

_LLAMA = ArchitectureFamily(
    name="llama",
    model_types=("llama",),
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp_in="model.layers.{}.mlp.up_proj",
    mlp="model.layers.{}.mlp",
    block="model.layers.{}",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
    n_layers_attr="num_hidden_layers",
    weight_transposed=False,
    prepends_bos=True,
    mlp_joins_residual=True,
)

_MISTRAL = ArchitectureFamily(
    name="mistral",
    model_types=("mistral",),
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp_in="model.layers.{}.mlp.up_proj",
    mlp="model.layers.{}.mlp",
    block="model.layers.{}",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
    n_layers_attr="num_hidden_layers",
    weight_transposed=False,
    prepends_bos=True,
    mlp_joins_residual=True,
)

FAMILIES: Mapping[str, ArchitectureFamily] = MappingProxyType({f.name: f for f in (_GPT2, _GPTJ, _LLAMA, _MISTRAL)})

_BY_MODEL_TYPE: Mapping[str, ArchitectureFamily] = MappingProxyType(
    {model_type: family for family in FAMILIES.values() for model_type in family.model_types}
)


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_BY_MODEL_TYPE))


def family_for_model_type(model_type: str) -> ArchitectureFamily:
    try:
        return _BY_MODEL_TYPE[model_type]
    except (KeyError, TypeError):
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type {model_type!r}; supported model_type values: "
            f"{', '.join(supported_model_types())}"
        ) from None
