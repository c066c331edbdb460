"""Setting an editor up: ask what it needs, provide exactly that, hand it over.

:func:`set_up` is the one place the contract of :mod:`editors.base` is driven. A :class:`Provider` answers
each kind of need for one loaded model; the certification harness has one (cached per model, C over the
model's statistics corpus), and a caller outside pytest writes its own or uses :class:`SimpleProvider`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from editors.base import Needs, Provided, TrainedNetworkNeed

__all__ = ["ProvisionError", "Provider", "SimpleProvider", "provide", "set_up"]


class ProvisionError(ValueError):
    """A need the provider cannot meet, or met with the wrong thing (a C of the wrong shape); names the editor."""


class Provider(Protocol):
    """Answers an editor's needs for one loaded model, measured on the unedited weights."""

    identity: str

    def second_moment(self, layer: int, n_samples: int) -> Any:
        """``C`` of the MLP output projection's inputs at ``layer`` (a ``d_in × d_in`` tensor)."""
        ...

    def context_templates(self, recipe: tuple[tuple[int, int], ...]) -> tuple[str, ...]: ...

    def trained_network(self, need: TrainedNetworkNeed) -> Path: ...

    def ordinary_texts(self) -> tuple[str, ...]:
        """The model's ordinary text (its perplexity corpus's texts), or ``()`` when the provider holds none.
        Optional: a provider without this method gives none, and editors that want it say less."""
        ...


def provide(editor_name: str, needs: Needs, provider: Provider, model: Any, family: Any) -> Provided:
    """What ``provider`` gives for ``needs``; each C is checked against the layer it is for."""
    moments: dict[int, Any] = {}
    if needs.second_moments is not None:
        for layer in needs.second_moments.layers:
            moment = provider.second_moment(layer, needs.second_moments.n_samples)
            d_in = _in_features(model, family, layer)
            if tuple(moment.shape) != (d_in, d_in):
                raise ProvisionError(f"{editor_name}: the second moment for layer {layer} has shape "
                                     f"{tuple(moment.shape)}, expected ({d_in}, {d_in})")
            moments[layer] = moment
    templates = None
    if needs.context_templates is not None:
        templates = provider.context_templates(tuple((int(n), int(k)) for n, k in needs.context_templates))
        if not templates or templates[0] != "{}":  # editors read row 0 as the bare prompt
            raise ProvisionError(f"{editor_name}: context templates must start with the bare '{{}}', got "
                                 f"{list(templates)[:2]!r}")
    network = None if needs.trained_network is None else provider.trained_network(needs.trained_network)
    texts: tuple[str, ...] = ()
    # ordinary text is a need an editor can do without: a provider written before it existed gives none
    ordinary = getattr(provider, "ordinary_texts", None)
    if needs.ordinary_text and ordinary is not None:
        texts = tuple(ordinary())
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ProvisionError(f"{editor_name}: ordinary text {i} is a {type(text).__name__}, not a string")
    return Provided(identity=provider.identity, second_moments=moments, context_templates=templates,
                    trained_network=network, ordinary_texts=texts)


def set_up(editor: Any, model: Any, tokenizer: Any, family: Any, provider: Provider) -> Provided:
    """Ask ``editor`` what it needs, provide it and call its ``setup``; returns what was provided."""
    provided = provide(editor.name, editor.needs(model, family), provider, model, family)
    editor.setup(model, tokenizer, family, provided)
    return provided


def _in_features(model: Any, family: Any, layer: int) -> int:
    weight = family.get_module(model, family.layer_name("mlp_out", layer)).weight
    return int(weight.shape[0] if family.weight_transposed else weight.shape[1])


class SimpleProvider:
    """A provider from values in hand: C per layer, templates per recipe (sampled from the model when not
    given), a trained network's directory and ordinary text. For a platform that already holds its statistics."""

    def __init__(self, model: Any, tokenizer: Any, *, identity: str = "",
                 second_moments: Mapping[int, Any] | None = None,
                 context_templates: Sequence[str] | None = None,
                 trained_network: str | Path | None = None,
                 ordinary_texts: Sequence[str] = ()) -> None:
        self.identity = identity
        self._model = model
        self._tokenizer = tokenizer
        self._moments = dict(second_moments or {})
        self._given_templates = tuple(context_templates) if context_templates is not None else None
        self._sampled: dict[tuple[tuple[int, int], ...], tuple[str, ...]] = {}
        self._network = Path(trained_network) if trained_network is not None else None
        self._ordinary_texts = tuple(ordinary_texts)

    def second_moment(self, layer: int, n_samples: int) -> Any:
        if layer not in self._moments:
            raise ProvisionError(f"no second moment given for layer {layer} (have {sorted(self._moments)})")
        return self._moments[layer]

    def context_templates(self, recipe: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
        if self._given_templates is not None:  # the caller's own templates, whatever the recipe
            return self._given_templates
        if recipe not in self._sampled:
            from editors.context import sample_context_templates

            self._sampled[recipe] = sample_context_templates(self._model, self._tokenizer, recipe)
        return self._sampled[recipe]

    def trained_network(self, need: TrainedNetworkNeed) -> Path:
        if self._network is None:
            raise ProvisionError(f"no trained {need.kind} network given; {need.train_hint}".rstrip("; "))
        return self._network

    def ordinary_texts(self) -> tuple[str, ...]:
        return self._ordinary_texts
