"""``editsafety`` (or ``python -m pytest_editsafety``): build the organisms, measure perplexity, rerun the
causal-site check, train a trained editor's network, mine a dataset for the cases most likely to collapse ROME,
show the hyper-parameters an editor would edit a model with.

Each command prints a human summary, or one JSON object with ``--json``. Errors the user can fix (an
unknown model, a missing corpus file) exit with status 2 and a one-line message, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("pytest_editsafety")


def _comma_list(text: str) -> list[str]:
    """``"rome, c-rome,"`` as ``["rome", "c-rome"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _emit(payload: Any, as_json: bool, human: str) -> None:
    sys.stdout.write((json.dumps(payload, indent=2, sort_keys=True) if as_json else human) + "\n")


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from pytest_editsafety.zoo import DEFAULT_BUILD, ensure_built, read_metadata, recipe_for

    names = list(DEFAULT_BUILD) if args.name == "all" else [recipe_for(args.name).name]
    report: dict[str, Any] = {}
    for name in names:
        directory = ensure_built(name, progress=not args.quiet)
        meta = read_metadata(directory)
        report[name] = {
            "path": str(directory),
            "recipe_hash": meta["recipe_hash"],
            "build_seconds": meta["build_seconds"],
            "heldout_ppl": meta["heldout_ppl"],
            "causal_layer": meta["causal_layer"],
            "recall_subject_first": meta["knowledge"]["recall_subject_first"],
            "recall_subject_later": meta["knowledge"]["recall_subject_later"],
            "recall_two_token_subjects": meta["knowledge"]["recall_two_token_subjects"],
            "weights_sha256": meta["weights_sha256"],
        }
    lines = [
        f"{n}: layer {r['causal_layer']} causal, held-out ppl {r['heldout_ppl']:.2f}, recall first/later "
        f"{r['recall_subject_first']:.3f}/{r['recall_subject_later']:.3f}, built in {r['build_seconds']:.0f} s "
        f"-> {r['path']}"
        for n, r in report.items()
    ]
    _emit(report, args.json, "\n".join(lines))
    return 0


def cmd_zoo_causal_site(args: argparse.Namespace) -> int:
    from pytest_editsafety.registry import load_model, resolve_model
    from pytest_editsafety.zoo import recipe_for
    from pytest_editsafety.zoo.causal_site import ablate_mlp_at_subject
    from pytest_editsafety.zoo.probe import fact_prompts
    from pytest_editsafety.zoo.world import LEAD_INS, World

    world = World(recipe_for(args.name).world)  # an unknown name fails here, before any model is loaded
    loaded = load_model(resolve_model(args.name))
    result = ablate_mlp_at_subject(loaded.model, loaded.tokenizer, loaded.family,
                                   fact_prompts(world, lead_ins=LEAD_INS[:2]))
    recorded = getattr(loaded.model.config, "editsafety_causal_layer", None)
    payload = {**result.to_dict(), "recorded_causal_layer": recorded, "agrees": recorded == result.causal_layer}
    drops = ", ".join(f"L{i}: {d:+.3f}" for i, d in enumerate(result.drop_by_layer))
    _emit(payload, args.json, f"{args.name}: causal layer {result.causal_layer} (recorded {recorded}); "
                              f"p(object) {result.baseline_prob:.3f}, drop when the subject's MLP output is zeroed: {drops}")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from pytest_editsafety.corpora import resolve_corpus
    from pytest_editsafety.plan import default_ppl_corpus
    from pytest_editsafety.perplexity import perplexity
    from pytest_editsafety.registry import LoadOptions, load_model, resolve_model

    spec = resolve_model(args.model)
    corpus = resolve_corpus(args.corpus or default_ppl_corpus(spec))
    loaded = load_model(spec, LoadOptions(dtype=args.dtype, device_map=args.device_map))
    result = perplexity(loaded.model, loaded.tokenizer, list(corpus.texts), batch_size=args.batch_size,
                        add_bos=args.add_bos, progress=not args.quiet)
    payload = {"model": args.model, "identity": loaded.identity, "corpus": corpus.name,
               "corpus_sha256": corpus.sha256, **{k: v for k, v in result.to_dict().items() if k != "per_sentence"}}
    _emit(payload, args.json, f"{args.model} on {corpus.name}: mean per-sentence ppl {result.mean_ppl:.2f} "
                              f"(paper-compatible), corpus ppl {result.corpus_ppl:.2f}, median {result.median_ppl:.2f}, "
                              f"max {result.max_ppl:.2f} over {result.n_sentences} sentences")
    return 0


def cmd_experiment_collapse(args: argparse.Namespace) -> int:
    from pytest_editsafety.experiment import render_table, run_collapse

    summary = run_collapse(
        args.model,
        editors=_comma_list(args.editors),
        case_sets=_comma_list(args.cases),
        corpus=args.corpus,
        limit=args.limit,
        layer=args.layer,
        strip_bos=args.strip_bos,
        progress=not args.quiet,
        overrides=_parse_overrides(args.set or ()),
    )
    _emit(summary, args.json, render_table(summary))
    return 0


def cmd_experiment_surrogate(args: argparse.Namespace) -> int:
    from pytest_editsafety.experiment import plot_surrogate, render_surrogate, run_surrogate

    summary = run_surrogate(
        args.model,
        tasks=_comma_list(args.tasks),
        editors=_comma_list(args.editors),
        limit=args.limit,
        sequential_edits=args.sequential_edits,
        sequential_every=args.sequential_every,
        task_limit=args.task_limit,
        progress=not args.quiet,
    )
    if args.plot:
        plot_surrogate(summary, args.plot)
    _emit(summary, args.json, render_surrogate(summary) + (f"\nscatter plot: {args.plot}" if args.plot else ""))
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pytest_editsafety.guard import guard

    decisions = guard(args.model, None, args.editor, args.cases, fraction=args.fraction, floor=args.floor,
                      interference_factor=args.interference_factor, apply=args.apply, max_ppl_ratio=args.max_ppl_ratio, hparams=args.hparams, cache_root=args.cache,
                      dtype=args.dtype, strip_bos=args.strip_bos)
    refused = [d for d in decisions if not d.allowed]
    rows = [["allow" if d.allowed else "REFUSE", d.prompt.replace("{}", d.subject, 1), d.target_new, d.denominator,
             d.floor, d.measures.get("interference"), d.interference_limit, "yes" if d.subject_first else "no",
             d.reason] for d in decisions]
    human = (f"{args.editor} on {args.model}: {len(refused)} of {len(decisions)} edits refused\n"
             + tabulate(rows, headers=["decision", "prompt", "target", "|uᵀk|", "floor", "interference", "limit",
                                       "subject first", "reason"],
                        floatfmt=".4g", tablefmt="github"))
    _emit({"model": args.model, "editor": args.editor, "refused": len(refused),
           "decisions": [d.to_dict() for d in decisions]}, args.json, human)
    return 1 if refused else 0


def cmd_mine(args: argparse.Namespace) -> int:
    from pytest_editsafety.cases import dump_cases
    from editors.storage import slugify
    from pytest_editsafety.mining import mine, mined_case_set, render_table

    default = f"mined-{slugify(args.editor)}-{slugify(Path(args.model).name)}.json"
    out = Path(args.out) if args.out else Path("reports") / default
    outputs: list[Path] = []

    def write(ranked: Any) -> None:
        # before any confirmation edit: the scores of the whole pool are the expensive part to lose
        outputs.append(dump_cases(mined_case_set(ranked.mined, editor=args.editor, model=args.model), out))
        log.info("wrote %d mined cases to %s", len(ranked.mined), outputs[0])

    report = mine(
        args.model,
        _comma_list(args.cases),
        top=args.top,
        editor=args.editor,
        mom2_adjustment=args.mom2,
        ppl_corpus=args.ppl_corpus,
        stats_corpus=args.stats_corpus,
        with_confirm=args.confirm,
        progress=not args.quiet,
        on_ranked=write,
    )
    written = outputs[0]
    payload = {**report.to_dict(), "out": str(written)}
    _emit(payload, args.json, f"{render_table(report)}\n\nwrote {len(report.mined)} cases to {written}; replay with "
                              f"pytest --editor={args.editor} --model={args.model} --cases={written}")
    return 0


_NEEDS_CASES = ("model {model!r} is not a model organism: give the training edits with --cases FILE (a case file "
                "in any supported format, disjoint from the cases you certify on)")


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from editors.registry import build_editor
    from pytest_editsafety.cache import cache_root
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.organisms import hparams_keys, is_organism, is_organism_model
    from pytest_editsafety.registry import LoadOptions, load_model, resolve_model
    from pytest_editsafety.trained import (
        case_set_description,
        cases_from_case_set,
        organism_training_data,
        read_record,
        train_network,
    )

    case_set = resolve_cases(args.cases) if args.cases else None  # a bad file fails before the model loads
    spec = resolve_model(args.model)
    if case_set is None and not is_organism(spec):  # before minutes of loading a large model for nothing
        raise ValueError(_NEEDS_CASES.format(model=args.model))
    root = cache_root(args.cache)
    loaded = load_model(spec, LoadOptions(dtype=args.dtype, device_map=args.device_map, cache_root=str(root)))
    if args.device_map is None and torch.cuda.is_available():
        loaded.model.to("cuda:0")
    editor = build_editor(args.editor, hparams_keys(loaded), loaded.model, user_hparams=args.hparams)
    need = editor.needs(loaded.model, loaded.family).trained_network
    if need is None:
        raise ValueError(f"editor {args.editor!r} needs no trained network with these hyper-parameters")
    if case_set is not None:
        cases = cases_from_case_set(case_set, seed=need.seed)
        data = case_set_description(case_set, cases)
    elif is_organism_model(loaded.model):
        cases, data = organism_training_data(loaded.model, need)
    else:
        raise ValueError(_NEEDS_CASES.format(model=args.model))
    path, trained = train_network(need, loaded.model, loaded.tokenizer, loaded.family, cases, data,
                                  identity=loaded.identity, root=root, force=args.force, progress=not args.quiet)
    record = read_record(path)
    report = record.get("training", {})
    payload = {"model": args.model, "editor": args.editor, "identity": loaded.identity, "network": str(path),
               "trained": trained, "data": record["data"], "training": report}
    verb = "trained" if trained else "reused (same model, hyper-parameters and data; --force retrains)"
    details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(report.items()))
    _emit(payload, args.json, f"{args.editor} for {args.model}: {verb} -> {path}\n  {details}")
    return 0

def _override_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string (kl_prompt={} is a)


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE (VALUE as JSON, e.g. layer=3, mom2_adjustment=true)")
        overrides[key.strip()] = _override_value(value)
    return overrides


def _has_symbolic(value: Any) -> bool:
    return any(isinstance(item, str) for item in (value if isinstance(value, list) else [value]))


def _resolve_for_display(editor: str, values: dict[str, Any], config: dict[str, Any] | None,
                         complete: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], list[str]]:
    """(values with layers resolved where possible, the symbolic values that were resolved, unresolved field ->
    why, problems). ``complete``: ``config`` is the model's own config.json or its published depth (else an unbuilt
    organism's recipe, whose causal layer its build measures)."""
    from types import SimpleNamespace

    from editors.hparams import HparamsError, resolve_hparams_layers, schema_for
    from editors.layers import parse_layers

    schema = schema_for(editor)
    if schema is None or schema.layer_key not in values:
        return dict(values), {}, {}, []
    field = schema.layer_key
    value = values[field]
    try:  # a form no model takes is a problem whatever is known of the model
        parse_layers(value)
    except HparamsError as err:
        return dict(values), {}, {}, [f"{field}: {err}"]
    symbolic = [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)]
    if config is None:
        if symbolic:
            return dict(values), {}, {field: f"{value!r} needs the model's config"}, []
        return dict(values), {}, {}, []
    if not complete and any(item.strip().startswith("causal") for item in symbolic):
        return dict(values), {}, {field: f"{value!r}: the organism's causal layer is measured when it is "
                                         "built"}, []
    try:
        resolved = resolve_hparams_layers(editor, values, SimpleNamespace(**config))
    except HparamsError as err:
        return dict(values), {}, {}, [f"{field}: {err}"]
    return resolved, ({field: value} if symbolic else {}), {}, []


def cmd_hparams(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from editors.families import family_for_model_type
    from editors.hparams import hparams_from_mapping, layer_hparams, schema_for
    from editors.registry import UnknownEditorError, available_editors
    from pytest_editsafety.model_check import config_is_complete, hparams_lookup_keys, known_config
    from pytest_editsafety.registry import resolve_model

    spec = resolve_model(args.model)
    editors = available_editors()
    if args.editor not in editors:
        raise UnknownEditorError(f"unknown editor {args.editor!r}; available: {', '.join(editors)}")
    overrides = _parse_overrides(args.set or ())
    config, config_source, notes = known_config(spec, args.cache)
    family = spec.family
    if not family and config is not None and isinstance(config.get("model_type"), str):
        family = family_for_model_type(config["model_type"]).name
    keys = hparams_lookup_keys(spec, config, family)
    schema = schema_for(args.editor)
    if schema is None:  # a third-party editor: its factory gets the user files and the overrides as they are
        from editors.hparams import OVERRIDES_LABEL
        from editors.registry import third_party_hparams

        values, sources = third_party_hparams(args.hparams, overrides)
        layers_out: list[dict[str, Any]] = [{"role": "user", "label": str(layer), "path": str(layer), "comment": None}
                                            for layer in args.hparams or ()]
        if overrides:
            layers_out.append({"role": "overrides", "label": OVERRIDES_LABEL, "path": None, "comment": None})
        notes = [*notes, f"{args.editor!r} has no built-in hyper-parameters: its factory gets the user file and "
                         "the overrides as they are"]
        resolved, symbolic, unresolved, problems = dict(values), {}, {}, []
    else:
        layered = layer_hparams(args.editor, keys, user_file=args.hparams, overrides=overrides, family=family or None)
        values, sources = dict(layered.values), dict(layered.sources)
        layers_out = [{"role": layer.role, "label": layer.label, "path": layer.path, "comment": layer.comment}
                      for layer in layered.layers]
        complete = config_is_complete(config_source)
        resolved, symbolic, unresolved, problems = _resolve_for_display(args.editor, values, config, complete)
        if not unresolved and not problems and not _has_symbolic(resolved[schema.layer_key]):
            try:
                hparams_from_mapping(schema.dataclass(), resolved, source=f"{args.editor} on {args.model}")
            except ValueError as err:
                problems.append(str(err))
    payload = {
        "model": args.model, "source": spec.source, "location": spec.location, "family": family or None,
        "editor": args.editor, "hparams_keys": list(keys), "layers": layers_out,
        "values": resolved, "sources": sources, "symbolic": symbolic, "unresolved": unresolved,
        "config": config_source or None, "notes": notes, "problems": problems,
    }
    rows = []
    for key, value in resolved.items():
        shown = json.dumps(value, ensure_ascii=False)
        if key in symbolic:
            shown += f"  (from {json.dumps(symbolic[key])})"
        rows.append([key, shown, sources.get(key, "")])
    lines = [f"{args.editor} on {args.model} ({spec.source} {spec.location}, family {family or 'unknown'}); "
             f"hparams keys {', '.join(dict.fromkeys(keys))}"]
    lines.append(tabulate(rows, headers=["hyper-parameter", "value", "from"], tablefmt="github"))
    if symbolic:
        lines.append(f"layers resolved against {config_source}")
    lines += [f"unresolved: {key}: {why}" for key, why in unresolved.items()]
    lines += [f"note: {note}" for note in notes]
    lines += [f"PROBLEM: {problem}" for problem in problems]
    for layer in layers_out:
        if layer["comment"]:
            lines.append(f"\n{layer['label']}:\n" + textwrap.fill(layer["comment"], width=110, initial_indent="  ",
                                                                    subsequent_indent="  "))
    _emit(payload, args.json, "\n".join(lines))
    return 1 if problems else 0


def _loading(parser: argparse.ArgumentParser, *, device_map: bool = True, cache: bool = True) -> None:
    """How a command loads its model: dtype, device map, cache root."""
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    if device_map:
        parser.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto or cuda:0")
    if cache:
        parser.add_argument("--cache", default=None, help="cache root (default $EDITSAFETY_CACHE or the user cache dir)")


def _output(parser: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editsafety",
        description="Build the model organisms, measure perplexity, run the papers' experiments, merge reports.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (and tracebacks of errors)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="merge certification JSONs and re-render the report (see: report --help)",
                        add_help=False)

    zoo = commands.add_parser("zoo", help="the built-in model organisms").add_subparsers(dest="zoo_command", required=True)
    build = zoo.add_parser("build", help="build (or reuse) organisms and report their measurements")
    build.add_argument("name", nargs="?", default="all",
                       help="tiny-gpt2, tiny-gptj, tiny-llama, tiny-gpt2-sink, or all (default: the first three; "
                            "tiny-gpt2-sink is built only by name)")
    _output(build)
    build.set_defaults(func=cmd_zoo_build)
    site = zoo.add_parser("causal-site", help="rerun the ablation that finds an organism's causal edit layer")
    site.add_argument("name")
    _output(site, quiet=False)
    site.set_defaults(func=cmd_zoo_causal_site)

    experiment = commands.add_parser("experiment", help="the papers' experiments on a model").add_subparsers(
        dest="experiment_command", required=True)
    collapse = experiment.add_parser("collapse", help="single ROME / C-ROME edits on hard vs normal cases")
    collapse.add_argument("--model", default="tiny-gpt2")
    collapse.add_argument("--editors", required=True, help="editors to compare, comma separated (the papers': "
                                                           "rome,c-rome,c-rome-prefix)")
    collapse.add_argument("--cases", default="hard,normal", help="case sets (names or files), comma separated")
    collapse.add_argument("--corpus", default=None, help="perplexity corpus, name or path (default organism-ppl "
                                                           "for organisms, me-ppl-50 otherwise)")
    collapse.add_argument("--limit", type=int, default=None, help="at most this many cases per set")
    collapse.add_argument("--layer", type=int, default=None, help="edit this layer instead of the hparams' one")
    collapse.add_argument("--strip-bos", action="store_true",
                          help="the papers' BOS-stripped protocol (A.2): a BOS family's tokenizer (Llama's <s>) "
                               "stops prepending BOS for edits, metrics, context templates and statistics; a no-op "
                               "for a tokenizer that prepends none (GPT-2, GPT-J)")
    collapse.add_argument("--set", action="append", metavar="KEY=VALUE",
                          help="a hyper-parameter every editor takes over its file's (VALUE as JSON, e.g. "
                               "mom2_ridge=0 or mom2_adjustment=false); repeatable")
    _output(collapse)
    collapse.set_defaults(func=cmd_experiment_collapse)
    surrogate = experiment.add_parser("surrogate", help="is perplexity a fair surrogate for downstream tasks? "
                                      "Spearman's rho between the perplexity ratio and each task's drop")
    surrogate.add_argument("--model", default="tiny-gpt2")
    surrogate.add_argument("--tasks", default="organism_mc,organism_cloze",
                           help="lm-eval tasks, comma separated (default the organisms' own)")
    surrogate.add_argument("--editors", default="rome,c-rome", help="editors of the single and sequential edits")
    surrogate.add_argument("--limit", type=int, default=24, help="single edits per editor and case set (hard, "
                           "normal; default 24)")
    surrogate.add_argument("--sequential-edits", type=int, default=24, help="hard cases each editor applies in "
                           "order for the sequential checkpoints (default 24; 0: none)")
    surrogate.add_argument("--sequential-every", type=int, default=4, help="a checkpoint every K edits (default 4)")
    surrogate.add_argument("--task-limit", type=int, default=None, help="at most N examples per task")
    surrogate.add_argument("--plot", default=None, metavar="PNG", help="write the scatter plot there (matplotlib)")
    _output(surrogate)
    surrogate.set_defaults(func=cmd_experiment_surrogate)

    from pytest_editsafety.guard import GUARD_INTERFERENCE_FACTOR

    guarding = commands.add_parser(
        "guard", help="decide, before any weight moves, which edits an editor may safely make (exit 1 if any refused)",
        description="For each edit request, the editor's own account of the edit from keys alone (ROME's |uᵀk| "
                    "and interference) against limits derived like the certification's floor: allow or refuse, with the reason and the "
                    "numbers. With --apply, allowed edits are made one after another, probe perplexity is measured "
                    "and an edit that breaks --max-ppl-ratio is rolled back.")
    guarding.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    guarding.add_argument("--editor", required=True, help="a registered editor name")
    guarding.add_argument("--cases", required=True, help="the edit requests: case set names or files, comma separated")
    guarding.add_argument("--fraction", type=float, default=0.5,
                          help="the floor as a fraction of the editor's median |uᵀk| over the model's normal "
                               "reference cases (default 0.5)")
    guarding.add_argument("--floor", type=float, default=None, help="an absolute floor instead of the fraction")
    guarding.add_argument("--interference-factor", type=float, default=GUARD_INTERFERENCE_FACTOR,
                          help="refuse an edit whose interference (the mean share of the update ordinary text's keys "
                               "receive) is above this multiple of the normal reference cases' median (default "
                               f"{GUARD_INTERFERENCE_FACTOR:g}; 0 turns the check off)")
    guarding.add_argument("--apply", action="store_true", help="make the allowed edits, roll back a damaging one")
    guarding.add_argument("--max-ppl-ratio", type=float, default=1.5, help="with --apply: the largest probe "
                                                                          "perplexity ratio kept (default 1.5)")
    guarding.add_argument("--hparams", default=None, action="append",
                          help="a JSON file of the editor's hyper-parameters or a named set; repeatable, layered in "
                               "order")
    guarding.add_argument("--strip-bos", action="store_true",
                          help="the papers' BOS-stripped protocol (A.2): judge edits with a BOS family's tokenizer "
                               "prepending no BOS (a no-op for GPT-2, GPT-J)")
    _loading(guarding, device_map=False)
    _output(guarding, quiet=False)
    guarding.set_defaults(func=cmd_guard)

    mining = commands.add_parser(
        "mine", help="rank a dataset's cases by ROME's denominator |uᵀkᵘ| (keys only) and write the most dangerous",
        description="Score every case by the denominator a rome edit would divide by, from the keys alone (no v* "
                    "optimisation, no perplexity), and write the K smallest as a case file that --cases replays.")
    mining.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    mining.add_argument("--cases", required=True, help="case sets (built-in names or files), comma separated; "
                                                       "scored as one pool")
    mining.add_argument("--top", type=int, required=True, help="how many of the most dangerous cases to write")
    mining.add_argument("--out", default=None, help="case file to write (default reports/mined-<editor>-<model>.json)")
    mining.add_argument("--editor", required=True, help="an editor that reports a denominator (e.g. rome, "
                                                        "c-rome): its layer, context templates and C are used, and "
                                                        "--confirm runs its edits")
    mining.add_argument("--mom2", action=argparse.BooleanOptionalAction, default=None,
                        help="score with C from text (--mom2) or C = I (--no-mom2) whatever the editor's hparams "
                             "say (default: the hparams decide)")
    mining.add_argument("--stats-corpus", default=None, help="corpus for C (default organism-wiki for "
                                                              "organisms, wikitext-103 otherwise)")
    mining.add_argument("--ppl-corpus", default=None, help="perplexity corpus for --confirm (default "
                                                           "organism-ppl for organisms, me-ppl-50 otherwise)")
    mining.add_argument("--confirm", action="store_true", help="also run full edits of the top K through the "
                                                               "harness and report perplexity ratio and efficacy")
    _output(mining)
    mining.set_defaults(func=cmd_mine)

    train = commands.add_parser(
        "train", help="train the network a trained editor (mend) needs for a model (cached; the editor loads it)",
        description="Train the network an editor declares it needs (MEND's hypernetwork) on edit requests with "
                    "locality samples and save it under the cache, keyed by the model's identity and the "
                    "hyper-parameters; certification runs with the same hyper-parameters and dtype find it.")
    train.add_argument("--editor", required=True, help="an editor that needs a trained network, e.g. mend")
    train.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    train.add_argument("--cases", default=None, help="training edits: a case set name or file (required "
                                                     "except for the organisms, which train on their world)")
    train.add_argument("--hparams", default=None, action="append",
                       help="a JSON file of the editor's hyper-parameters over the built-in ones, or a named set; "
                            "repeatable, layered in order")
    train.add_argument("--force", action="store_true", help="retrain even if the cache holds this network")
    _loading(train)
    _output(train)
    train.set_defaults(func=cmd_train)

    hparams = commands.add_parser(
        "hparams", help="the hyper-parameters an editor edits a model with, and the file each value comes from",
        description="Layer the built-in file for the model (by name, else its family), the --hparams files and named "
                    "sets in order, and the --set overrides, as a certification run does; resolve symbolic layers "
                    "('causal', 'last-N', 'K/N') against the model's config.json where it can be read without "
                    "loading or downloading (organisms once built, local directories, Hugging Face ids in the local "
                    "cache; a built-in hub model's published depth otherwise) and say what could not be resolved. Exit 1 when the values do not fit the model (a layer out of "
                    "range, a wrong type), 2 for an unknown model or editor.")
    hparams.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    hparams.add_argument("--editor", required=True, help="a registered editor name")
    hparams.add_argument("--hparams", default=None, action="append",
                         help="a JSON file over the built-in values, or the name of a built-in named set (e.g. "
                              "kmeng01: ROME's original configs, mom2_adjustment on); repeatable, layered in order "
                              "(--hparams kmeng01 --hparams my.json)")
    hparams.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="an override over both (VALUE as JSON: layer=3, mom2_adjustment=true); repeatable")
    hparams.add_argument("--cache", default=None, help="cache root where organisms are built (default "
                                                       "$EDITSAFETY_CACHE or the user cache dir)")
    _output(hparams, quiet=False)
    hparams.set_defaults(func=cmd_hparams)

    ppl = commands.add_parser("ppl", help="perplexity of a model on a corpus")
    ppl.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    ppl.add_argument("--corpus", default=None,
                     help="me-ppl-50, me-ppl-1k, me-ppl-10k, organism-ppl, organism-wiki, organism-heldout or a path "
                          "(default organism-ppl for organisms, me-ppl-50 otherwise)")
    ppl.add_argument("--batch-size", type=int, default=16)
    ppl.add_argument("--add-bos", action="store_true", help="prepend BOS (BOS families) and score every token")
    _loading(ppl, cache=False)
    _output(ppl)
    ppl.set_defaults(func=cmd_ppl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        # merging and re-rendering certification JSONs has its own parser and exit codes (4 = usage error)
        from pytest_editsafety.report_cli import main as report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # our own debug records (tracebacks of errors), not every library's
        log.setLevel(logging.DEBUG)
    try:
        return args.func(args)
    except ValueError as err:  # the project's user-facing errors are ValueErrors that name what is wrong
        log.debug("command failed", exc_info=True)  # -v shows the traceback behind the one-line message
        sys.stderr.write(f"error: {err}\n")
        return 2
