"""What a caller of the Python API hands in, checked and turned into the plugin's own objects.

:func:`pytest_editsafety.api.certify` and :class:`pytest_editsafety.guard.Guard` take models (names or objects in
hand), editors (names or objects), cases, hyper-parameters and bounds in the forms a Python caller has them; each
function here checks one of those forms, raising ``ValueError`` naming the argument, and gives back what the plan
and the hub take (:func:`plan_and_hub` builds both).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_editsafety.bounds import Bounds
from pytest_editsafety.cases import CaseSet, EditCase

__all__ = ["API_CASE_SET", "case_sets", "check_bound", "checked_bounds", "edit_requests", "editors_by_name",
           "held_model", "hparams_options", "is_editor_object", "is_organism_plan", "measuring", "plan_and_hub"]

# the name of the case set a sequence of EditCase given to certify() becomes
API_CASE_SET = "cases"


def held_model(model: Any, tokenizer: Any, strip_bos: bool = False) -> Any:
    """A model object in hand as the registry's ``LoadedModel``: its family, layers and identity. ``strip_bos``
    strips the BOS of a *copy* of ``tokenizer`` (:mod:`pytest_editsafety.bos`): the caller's own is left as given."""
    from editors.families import family_for_model_type
    from pytest_editsafety.registry import LoadedModel, ModelSpec, UnknownModelError, local_identity, resolve_model
    from pytest_editsafety.zoo.recipe import organism_recipe_hash

    if tokenizer is None:
        raise ValueError("tokenizer: a model object needs its tokenizer (pass a model name to load both)")
    if isinstance(tokenizer, (str, Path)) or not callable(tokenizer):
        raise ValueError(f"tokenizer: expected the model's tokenizer object (a transformers tokenizer), got "
                         f"{type(tokenizer).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "named_parameters"):
        raise ValueError(f"model: expected a model name or a transformers model (with a .config), got "
                         f"{type(model).__name__}")
    family = family_for_model_type(config.model_type)
    name = str(getattr(config, "_name_or_path", "") or "")
    try:
        spec = resolve_model(name) if name else None
    except (UnknownModelError, ValueError):
        spec = None
    if spec is None:
        spec = ModelSpec(name=name or type(model).__name__, source="local", location=name, family=family.name,
                         revision=None, description="a model object passed to the API")
    recipe_hash = organism_recipe_hash(config)
    if recipe_hash is not None:
        identity = recipe_hash
    elif name and spec.source == "local" and Path(spec.location).is_dir():
        identity = local_identity(Path(spec.location))
    elif name:
        identity = f"{name}@{getattr(config, '_commit_hash', None) or 'unpinned'}"
    else:  # a model built in memory names nothing: its weights are its identity (the caches are keyed by it)
        from editors.restore import model_digest

        identity = f"{type(model).__name__}:{model_digest(model)[:32]}"
    stripped = False
    if strip_bos:
        import copy

        from pytest_editsafety.bos import strip_bos as strip, stripped_identity

        tokenizer = copy.deepcopy(tokenizer)
        stripped = strip(tokenizer, spec.name)
        identity = stripped_identity(identity) if stripped else identity
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, family=family,
                       n_layers=family.n_layers(config), identity=identity, bos_stripped=stripped)


def case_sets(cases: Any) -> list[str | CaseSet]:
    if isinstance(cases, (str, Path)):  # names or files, comma-separated as on the command line
        return [part.strip() for part in str(cases).split(",") if part.strip()]
    if isinstance(cases, CaseSet):
        return [cases]
    if isinstance(cases, EditCase):
        cases = (cases,)
    elif not isinstance(cases, Iterable):
        raise ValueError(f"cases: expected a case set name, a case file, a CaseSet or a non-empty sequence of "
                         f"EditCase; got {type(cases).__name__}")
    cases = tuple(cases)
    if not cases or not all(isinstance(c, EditCase) for c in cases):
        raise ValueError("cases: expected a case set name, a case file, a CaseSet or a non-empty sequence of EditCase")
    return [CaseSet(name=API_CASE_SET, cases=cases, source="given to certify()", format="canonical")]


def editors_by_name(editor: Any) -> dict[str, Any]:
    """``editor`` by name, in the order given, each a registered name or an editor object: one name, names separated
    by commas (as ``--editor`` takes them), one editor object, or a sequence of names and objects; unknown names and
    repeats are errors."""
    from editors.registry import available_editors

    if isinstance(editor, str):
        given: list[Any] = [part.strip() for part in editor.split(",") if part.strip()]
    elif is_editor_object(editor) or not isinstance(editor, Sequence):
        given = [editor]
    else:
        given = list(editor)
    if not given:
        raise ValueError("editor: expected an editor name, an editor object or a sequence of them; got none")
    by_name: dict[str, Any] = {}
    for each in given:
        if isinstance(each, str) and each not in available_editors():
            raise ValueError(f"editor: unknown editor {each!r}; available: {', '.join(available_editors())}")
        name = each if isinstance(each, str) else getattr(each, "name", None)
        if is_editor_object(each) and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"editor: {each!r} has no name (its 'name' attribute is {name!r}); an editor object "
                             f"names itself in records and reports")
        if not (isinstance(each, str) or is_editor_object(each)) or not isinstance(name, str) or not name:
            raise ValueError(f"editor: {each!r} is neither an editor name nor an editor object (editors.base: a name "
                             f"and an apply method)")
        if name in by_name:
            raise ValueError(f"editor: {name} given more than once")
        by_name[name] = each
    return by_name


def is_editor_object(value: Any) -> bool:
    return not isinstance(value, (str, Path)) and callable(getattr(value, "apply", None))


def hparams_options(hparams: Any, editors: Mapping[str, Any]) -> dict[str, Any]:
    """HubOptions' ``editor_hparams`` for ``hparams`` as :func:`certify` takes it: for one editor, a JSON file or
    named set, a sequence of them (layered in order: ``("kmeng01", "my.json")``) or a mapping of fields; for any
    number, a mapping from (some of) the editors' names to one of those each. Hyper-parameters reach only editors
    given by name: an editor object carries its own."""
    if hparams is None or (isinstance(hparams, Mapping) and not hparams):
        return {}
    names = list(editors)
    if not (isinstance(hparams, Mapping) and set(hparams) <= set(names)):  # not the per-editor form
        if len(names) == 1:
            hparams = {names[0]: hparams}
        elif isinstance(hparams, Mapping):
            raise ValueError(f"hparams: with several editors, its keys name editors; "
                             f"{', '.join(sorted(map(str, set(hparams) - set(names))))} is not one of {', '.join(names)}")
        else:
            raise ValueError(f"hparams: with several editors ({', '.join(names)}), expected a mapping from editor "
                             f"name to its JSON file or fields, got {type(hparams).__name__}")
    given_as_objects = sorted(name for name in hparams if not isinstance(editors[name], str))
    if given_as_objects:
        raise ValueError(f"hparams: {', '.join(given_as_objects)} was given as an editor object, which carries its "
                         f"own hyper-parameters; build it with the ones you want instead")
    per_name: dict[str, Any] = {}
    for name, value in hparams.items():
        if isinstance(value, (str, Path)):
            per_name[name] = str(value)
        elif isinstance(value, Mapping):
            per_name[name] = dict(value)
        elif isinstance(value, Sequence) and value and all(isinstance(each, (str, Path)) for each in value):
            per_name[name] = tuple(map(str, value))
        else:
            raise ValueError(f"hparams[{name!r}]: expected a JSON file or named set, a non-empty sequence of them, or "
                             f"a mapping of fields; got {type(value).__name__}")
    return {"editor_hparams": per_name}


def plan_and_hub(model: Any, tokenizer: Any, editor: Any, sets: Sequence[str | CaseSet], *,
                 bounds: Bounds | Mapping[str, Any] | None, corpus: str | None, limit: int | None, sequential: bool,
                 hparams: Any, stats_corpus: str | None, stats_dir: str | None, cache_root: str | None,
                 dtype: str | None, strip_bos: bool, sequential_edits: int | None = None,
                 sequential_every: int | None = None, sequential_corpus: str | None = None, batch_size: int = 1,
                 search_batch: int | None = None, downstream: Sequence[str] = (),
                 downstream_limit: int | None = None) -> tuple[Any, Any]:
    """The plan and the hub for one model and its editors (:func:`editors_by_name`): the plugin's own, with the
    caller's objects in it."""
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    editors = editors_by_name(editor)
    given_hparams = hparams_options(hparams, editors)
    run_bounds = checked_bounds(bounds)
    if isinstance(model, str) and tokenizer is not None:
        raise ValueError(f"tokenizer: model {model!r} is given by name and loads its own tokenizer; pass None, or "
                         f"pass the model object with its tokenizer")
    if not isinstance(model, str) and dtype is not None:
        raise ValueError(f"dtype: a model you hold runs in its own dtype; convert it first (model.to(...)) or give "
                         f"the model by name to load it in {dtype!r}")
    held = None if isinstance(model, str) else held_model(model, tokenizer, strip_bos)
    plan = build_plan(list(editors), [model if held is None else held.spec], list(sets), ppl_corpus=corpus,
                      limit=limit, sequential=sequential, sequential_edits=sequential_edits,
                      sequential_ppl_corpus=sequential_corpus, batch_size=batch_size)
    options = HubOptions(
        bounds=run_bounds, dtype=dtype, stats_dir=stats_dir, stats_corpus=stats_corpus, cache_root=cache_root,
        strip_bos=strip_bos, sequential_every=sequential_every, search_batch=search_batch,
        downstream=tuple(downstream), downstream_limit=downstream_limit, **given_hparams,
    )
    slug = plan.models[0].slug
    objects = {name: each for name, each in editors.items() if not isinstance(each, str)}
    hub = ModelHub(plan, options, models={slug: held} if held is not None else None, editors=objects or None)
    return plan, hub


def measuring(model: Any) -> Any:
    """Around the measurements of a model the caller holds: eval mode (dropout off), each module's mode given back
    after (:func:`editors.hooks.eval_mode`); nothing for a model given by name, which loads in eval mode."""
    import contextlib

    if isinstance(model, str):
        return contextlib.nullcontext()
    from editors.hooks import eval_mode

    return eval_mode(model)


def checked_bounds(bounds: Any) -> Bounds:
    """``bounds`` as certify takes it: None (the plugin's defaults), a ``Bounds``, or a mapping of its fields."""
    if bounds is None:
        return Bounds()
    if isinstance(bounds, Bounds):
        return bounds
    if isinstance(bounds, Mapping):
        return Bounds.from_mapping(bounds)
    raise ValueError(f"bounds: expected None, a pytest_editsafety.bounds.Bounds or a mapping of its fields, got "
                     f"{type(bounds).__name__}")


def is_organism_plan(model: Any) -> bool:
    from pytest_editsafety.organisms import is_organism, is_organism_model
    from pytest_editsafety.registry import resolve_model

    return is_organism(resolve_model(model)) if isinstance(model, str) else is_organism_model(model)


def check_bound(name: str, value: Any, *, none_ok: bool = False, infinite_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0 \
        and (math.isfinite(value) or (infinite_ok and value == math.inf))
    if not ok:
        allowed = ("None or " if none_ok else "") + "a finite number >= 0" + (" or inf" if infinite_ok else "")
        raise ValueError(f"{name}: expected {allowed}, got {value!r}")


def edit_requests(requests: Any) -> list[Any]:
    from editors.base import EditRequest
    from pytest_editsafety.cases import resolve_cases

    if isinstance(requests, Mapping):
        raise ValueError("requests: a mapping is not a request; pass EditRequest(**it) (subject, prompt, target_new)")
    if isinstance(requests, (EditRequest, EditCase)):
        requests = [requests]
    elif isinstance(requests, (str, Path)):  # case set names or files, comma-separated as on the command line
        requests = [c for part in str(requests).split(",") if part.strip() for c in resolve_cases(part.strip()).cases]
    elif isinstance(requests, CaseSet):
        requests = requests.cases
    elif not isinstance(requests, Iterable):
        raise ValueError(f"requests: expected an EditRequest, an EditCase, a sequence of them, a CaseSet or case set "
                         f"names; got {type(requests).__name__}")
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, EditRequest):
            out.append(r)
        elif isinstance(r, EditCase):
            out.append(EditRequest(r.subject, r.prompt, r.target_new))
        else:
            raise ValueError(f"requests[{i}]: expected an EditRequest or an EditCase, got {type(r).__name__} "
                             f"(a mapping of subject, prompt, target_new is EditRequest(**it))")
    return out
