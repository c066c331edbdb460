"""``editsafety`` (or ``python -m pytest_editsafety``): build the organisms, measure perplexity, rerun the
causal-site check, train a trained editor's network, mine a dataset for the cases most likely to collapse ROME.

Each command prints a human summary, or one JSON object with ``--json``. Errors the user can fix (an
unknown model, a missing corpus file) exit with status 2 and a one-line message, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("pytest_editsafety")


def _emit(payload: Any, as_json: bool, human: str) -> None:
    sys.stdout.write((json.dumps(payload, indent=2, sort_keys=True) if as_json else human) + "\n")


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from pytest_editsafety.zoo import RECIPES, ensure_built, read_metadata, recipe_for

    names = sorted(RECIPES) if args.name == "all" else [recipe_for(args.name).name]
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
        editors=[e.strip() for e in args.editors.split(",") if e.strip()],
        case_sets=[c.strip() for c in args.cases.split(",") if c.strip()],
        corpus=args.corpus,
        limit=args.limit,
        layer=args.layer,
        progress=not args.quiet,
    )
    _emit(summary, args.json, render_table(summary))
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from pytest_editsafety.api import guard

    decisions = guard(args.model, None, args.editor, args.cases, fraction=args.fraction, floor=args.floor,
                      apply=args.apply, max_ppl_ratio=args.max_ppl_ratio, hparams=args.hparams, cache_root=args.cache,
                      dtype=args.dtype)
    refused = [d for d in decisions if not d.allowed]
    rows = [["allow" if d.allowed else "REFUSE", d.prompt.replace("{}", d.subject, 1), d.target_new, d.denominator,
             d.floor, "yes" if d.subject_first else "no", d.reason] for d in decisions]
    human = (f"{args.editor} on {args.model}: {len(refused)} of {len(decisions)} edits refused\n"
             + tabulate(rows, headers=["decision", "prompt", "target", "|uᵀk|", "floor", "subject first", "reason"],
                        floatfmt=".4g", tablefmt="github"))
    _emit({"model": args.model, "editor": args.editor, "refused": len(refused),
           "decisions": [d.to_dict() for d in decisions]}, args.json, human)
    return 1 if refused else 0


def cmd_mine(args: argparse.Namespace) -> int:
    from pathlib import Path

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
        [c.strip() for c in args.cases.split(",") if c.strip()],
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
                       help="tiny-gpt2, tiny-gptj, tiny-llama, tiny-gpt2-sink or all (default)")
    build.add_argument("--json", action="store_true")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_zoo_build)
    site = zoo.add_parser("causal-site", help="rerun the ablation that finds an organism's causal edit layer")
    site.add_argument("name")
    site.add_argument("--json", action="store_true")
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
    collapse.add_argument("--json", action="store_true")
    collapse.add_argument("--quiet", action="store_true")
    collapse.set_defaults(func=cmd_experiment_collapse)

    guarding = commands.add_parser(
        "guard", help="decide, before any weight moves, which edits an editor may safely make (exit 1 if any refused)",
        description="For each edit request, the editor's own account of the edit from keys alone (ROME's |uᵀk|) "
                    "against a floor derived like the certification's: allow or refuse, with the reason and the "
                    "numbers. With --apply, allowed edits are made one after another, probe perplexity is measured "
                    "and an edit that breaks --max-ppl-ratio is rolled back.")
    guarding.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    guarding.add_argument("--editor", required=True, help="a registered editor name")
    guarding.add_argument("--cases", required=True, help="the edit requests: case set names or files, comma separated")
    guarding.add_argument("--fraction", type=float, default=0.5,
                          help="the floor as a fraction of the editor's median |uᵀk| over the model's normal "
                               "reference cases (default 0.5)")
    guarding.add_argument("--floor", type=float, default=None, help="an absolute floor instead of the fraction")
    guarding.add_argument("--apply", action="store_true", help="make the allowed edits, roll back a damaging one")
    guarding.add_argument("--max-ppl-ratio", type=float, default=1.5, help="with --apply: the largest probe "
                                                                          "perplexity ratio kept (default 1.5)")
    guarding.add_argument("--hparams", default=None, help="a JSON file of the editor's hyper-parameters")
    guarding.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    guarding.add_argument("--cache", default=None, help="cache root (default $EDITSAFETY_CACHE or the user cache dir)")
    guarding.add_argument("--json", action="store_true")
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
    mining.add_argument("--stats-corpus", default=None, help="corpus for C (default organism-heldout for "
                                                              "organisms, the perplexity corpus otherwise)")
    mining.add_argument("--ppl-corpus", default=None, help="perplexity corpus for --confirm (default "
                                                           "organism-ppl for organisms, me-ppl-50 otherwise)")
    mining.add_argument("--confirm", action="store_true", help="also run full edits of the top K through the "
                                                               "harness and report perplexity ratio and efficacy")
    mining.add_argument("--json", action="store_true")
    mining.add_argument("--quiet", action="store_true", help="no progress bar")
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
    train.add_argument("--hparams", default=None, help="a JSON file of the editor's hyper-parameters over the "
                                                       "built-in ones")
    train.add_argument("--force", action="store_true", help="retrain even if the cache holds this network")
    train.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    train.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto or cuda:0")
    train.add_argument("--cache", default=None, help="cache root (default $EDITSAFETY_CACHE or the user cache dir)")
    train.add_argument("--json", action="store_true")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ppl = commands.add_parser("ppl", help="perplexity of a model on a corpus")
    ppl.add_argument("--model", required=True, help="built-in name, Hugging Face id or local path")
    ppl.add_argument("--corpus", default=None,
                     help="me-ppl-50, me-ppl-1k, me-ppl-10k, organism-ppl, organism-heldout or a path "
                          "(default organism-ppl for organisms, me-ppl-50 otherwise)")
    ppl.add_argument("--batch-size", type=int, default=16)
    ppl.add_argument("--add-bos", action="store_true", help="prepend BOS (BOS families) and score every token")
    ppl.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    ppl.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto or cuda:0")
    ppl.add_argument("--json", action="store_true")
    ppl.add_argument("--quiet", action="store_true")
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
