"""What a certified case costs, the plain path against the optimised one, piece by piece (issue 20).

    python benchmarks/speed.py --model tiny-gpt2            # a table; about two minutes on 2 CPU cores
    python benchmarks/speed.py --model tiny-gpt2 --json     # one JSON object (per_case_speedup, ...)
    python benchmarks/speed.py --model tiny-llama --editor c-rome --cases normal --sizes none

On the same model, editor and cases (ROME-family or MEMIT-family editor, the model's own hyper-parameters and
statistics, as a certification sets them up), each case is certified's pieces are timed twice, the two paths
alternating which goes first:

* plain: v*'s (or z's) search runs the whole batch of templated prompts through the whole model at every step
  (``v_cached_prefix`` off), and the perplexity corpus is tokenized at every measurement;
* optimised: the search runs each step only over the positions δ reaches, on a key/value cache of the positions
  before the subject's last token (:mod:`editors.suffix`), the corpus's ids are kept, and the perplexity replays
  the blocks below the edited layer (:mod:`pytest_editsafety.lower_blocks`; nothing on an organism, whose edits
  are at layer 0): what the harness does.

``sharing_editors`` are the available editors whose search for a case is this editor's own (equal measurement keys):
a run that certifies them all searches once per case and hands the value to each (pytest_editsafety.shared_measurements),
so ``per_case_shared_run_s`` is the optimised case with the search paid by one of them, derived from the pieces, and
``shared_run_speedup`` the plain per-case cost over it.

Pieces: ``v_star`` (the editor's measurement: keys and the search), ``delta_w`` (the rest of the edit: the update
and writing it), ``metrics`` (efficacy, generalization, locality), ``perplexity`` (the edited model on the
model's perplexity corpus) and ``restore`` (weights back and the whole-model check). ``bare_forward_s`` is one
inference pass over the corpus in the perplexity's own sorted batches (logits, nothing else):
``ppl_to_bare_forward_ratio`` is the optimised perplexity over it. ``sizes`` measures one search step (plain and
cached, the mean of ``--size-steps``), the bare forward pass and the perplexity after an edit at the edit layer
(every block run, and the blocks below replayed) as the model grows: the organism, then GPT-2 124M's
shape with random weights (nothing downloaded; the organism's tokenizer, the edit at layer 5 of 12, where the
figures in the README were first measured; a real `gpt2` run now edits layer 4, the family default's '17/48') and the
same with 2x and 4x the depth (the edit at the same relative depth).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIECES = ("v_star", "delta_w", "metrics", "perplexity", "restore")
PATHS = ("plain", "optimised")


def _seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


@dataclasses.dataclass
class Bench:
    loaded: Any
    editors: dict[str, Any]
    corpus: Any
    encoded: list[list[int]]
    reference: Any
    resources: Any
    lower_blocks: Any = None  # the optimised path's pytest_editsafety.lower_blocks.LowerBlockStore


def _set_up(model_name: str, editor_name: str) -> Bench:
    from editors.fingerprint import ModelFingerprint
    from editors.provision import set_up
    from editors.registry import build_editor
    from editors.stats import SecondMomentCache
    from pytest_editsafety.cache import cache_root
    from pytest_editsafety.lower_blocks import LowerBlockStore
    from pytest_editsafety.corpora import resolve_corpus
    from pytest_editsafety.organisms import hparams_keys
    from pytest_editsafety.perplexity import encode, model_context
    from pytest_editsafety.plan import ORGANISM_STATS_CORPUS, REAL_STATS_CORPUS, default_ppl_corpus, is_organism
    from pytest_editsafety.registry import load_model, resolve_model
    from pytest_editsafety.resources import ModelResources

    loaded = load_model(resolve_model(model_name))
    root = cache_root()
    ppl_corpus = default_ppl_corpus(loaded.spec)
    stats_corpus = ORGANISM_STATS_CORPUS if is_organism(loaded.spec) else REAL_STATS_CORPUS
    resources = ModelResources(loaded, cache_root=root, stats_corpus=lambda: resolve_corpus(stats_corpus),
                               stats_cache=SecondMomentCache(root / "stats"))
    editors = {}
    for path in PATHS:
        editor = build_editor(editor_name, hparams_keys(loaded), loaded.model,
                              overrides={"v_cached_prefix": path == "optimised"})
        set_up(editor, loaded.model, loaded.tokenizer, loaded.family, resources)
        editors[path] = editor
    corpus = resolve_corpus(ppl_corpus)
    encoded = encode(loaded.tokenizer, corpus.texts, max_length=model_context(loaded.model))
    return Bench(loaded, editors, corpus, encoded, ModelFingerprint.of(loaded.model), resources, LowerBlockStore())


def _certify_pieces(bench: Bench, path: str, case: Any, probe: Any) -> dict[str, float]:
    """One case's pieces on ``path``; the model is restored (and checked) at the end."""
    from editors.base import EditRequest
    from editors.restore import ParameterSnapshot
    from pytest_editsafety.hub_options import PPL_BATCH_SIZE
    from pytest_editsafety.lower_blocks import lowest_block
    from pytest_editsafety.metrics import edit_metrics
    from pytest_editsafety.perplexity import perplexity

    loaded, editor = bench.loaded, bench.editors[path]
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    request = EditRequest(case.subject, case.prompt, case.target_new)
    snapshot = ParameterSnapshot.from_model(model, editor.parameters_touched(model, family))
    measured: dict[str, float] = {}
    measure = editor.measure if hasattr(editor, "measure") else None

    def timed_measure(*args: Any, **kwargs: Any) -> Any:
        seconds, value = _seconds(lambda: measure(*args, **kwargs))
        measured["v_star"] = measured.get("v_star", 0.0) + seconds
        return value

    def timed_targets(*args: Any, **kwargs: Any) -> Any:
        seconds, value = _seconds(lambda: targets(*args, **kwargs))
        measured["v_star"] = measured.get("v_star", 0.0) + seconds
        return value

    targets = getattr(editor, "targets", None)
    try:
        # the search is the editor's own method (ROME's measure, MEMIT's targets): timed apart from the rest
        if measure is not None:
            editor.measure = timed_measure
        if targets is not None:
            editor.targets = timed_targets
        edit_s, outcome = _seconds(lambda: editor.apply(model, tokenizer, family, [request]))
    finally:
        editor.__dict__.pop("measure", None)
        editor.__dict__.pop("targets", None)
    prefix = outcome.test_prefix if case.is_hard else None
    metrics_s, _ = _seconds(lambda: edit_metrics(model, tokenizer, case, probe, test_prefix=prefix))
    encoded, lower = None, None
    if path == "optimised":  # what the harness does: the ids kept, the blocks below the edit replayed
        encoded = bench.encoded
        layer = lowest_block(family, editor.parameters_touched(model, family), loaded.n_layers)
        lower = bench.lower_blocks.outputs(model, family, bench.corpus.name, PPL_BATCH_SIZE, layer)
    ppl_s, _ = _seconds(lambda: perplexity(model, tokenizer, bench.corpus.texts, batch_size=PPL_BATCH_SIZE,
                                           encoded=encoded, lower_blocks=lower))

    def restore() -> None:
        snapshot.restore()
        bench.reference.check(model, editor="bench", declared=snapshot)

    restore_s, _ = _seconds(restore)
    v_star = measured.get("v_star", 0.0)
    return {"v_star": v_star, "delta_w": edit_s - v_star, "metrics": metrics_s, "perplexity": ppl_s,
            "restore": restore_s}


def bare_forward_seconds(model: Any, tokenizer: Any, encoded: Sequence[Sequence[int]], batch_size: int) -> float:
    """One inference pass over the corpus in the perplexity's sorted batches: the floor a measurement can reach."""
    from editors.text import pad_id, padded
    from pytest_editsafety.perplexity import MAX_BATCH_LOGITS, length_batches, output_vocabulary, position_ids_from_mask

    order = sorted((i for i, ids in enumerate(encoded) if len(ids) >= 2), key=lambda i: len(encoded[i]), reverse=True)
    batches = length_batches(order, [len(ids) for ids in encoded], batch_size, output_vocabulary(model),
                             MAX_BATCH_LOGITS)
    pad = pad_id(tokenizer)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids, mask = padded([encoded[i] for i in batch], pad)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return time.perf_counter() - start


def perplexity_replay_seconds(model: Any, tokenizer: Any, family: Any, encoded: Sequence[Sequence[int]],
                              batch_size: int, layer: int) -> tuple[float, float]:
    """The perplexity over ``encoded`` with every block run, and with the blocks below ``layer`` replayed (after an
    edit at ``layer``: pytest_editsafety.lower_blocks), the recording pass left out of the timing."""
    from pytest_editsafety.lower_blocks import LowerBlockStore
    from pytest_editsafety.perplexity import sentence_nlls

    texts = [""] * len(encoded)  # only names sentences in warnings; the ids are given
    lower = LowerBlockStore().outputs(model, family, "bench", batch_size, layer)
    sentence_nlls(model, tokenizer, texts, batch_size=batch_size, encoded=encoded, lower_blocks=lower)
    full, _ = _seconds(lambda: sentence_nlls(model, tokenizer, texts, batch_size=batch_size, encoded=encoded))
    replayed, _ = _seconds(lambda: sentence_nlls(model, tokenizer, texts, batch_size=batch_size, encoded=encoded,
                                                  lower_blocks=lower))
    return full, replayed


def _size_models(organism: Any) -> list[tuple[str, Any, int]]:
    """(name, model, edit layer): the organism, then GPT-2 124M's shape at 1x, 2x and 4x its depth."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shapes = [("organism", organism.model, None)]
    for factor in (1, 2, 4):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=12 * factor)).eval()
        shapes.append((f"gpt2-124m-shape x{factor} depth", model, 5 * factor))
    return shapes


def measure_sizes(bench: Bench, cases: Sequence[Any], steps: int, batch_size: int) -> list[dict[str, Any]]:
    from editors.base import EditRequest
    from editors.families import family_for_model_type
    from editors.rome import RomeHparams, keys_and_outputs, search_value_delta

    loaded = bench.loaded
    tokenizer = loaded.tokenizer
    templates = bench.editors["plain"]._contexts(loaded.model, tokenizer)
    rows = []
    for name, model, layer in _size_models(loaded):
        family = family_for_model_type(model.config.model_type)
        layer = layer if layer is not None else _editor_layer(bench.editors["plain"])
        per_path: dict[str, list[float]] = {"plain": [], "cached": []}
        for case in cases:
            request = EditRequest(case.subject, case.prompt, case.target_new)
            _, outputs, _ = keys_and_outputs(model, tokenizer, family, layer, templates, request)
            for cached in (False, True):
                # no early stop: every case runs the same number of steps on both paths
                hp = RomeHparams(layer=layer, v_num_grad_steps=steps + 1, early_stop_below=0.0, v_cached_prefix=cached)
                seconds, _ = _seconds(lambda: search_value_delta(model, tokenizer, family, hp, templates, request,
                                                                 outputs[0]))
                per_path["cached" if cached else "plain"].append(seconds / (steps + 1))
        plain, cached = statistics.mean(per_path["plain"]), statistics.mean(per_path["cached"])
        forward = bare_forward_seconds(model, tokenizer, bench.encoded[:64], batch_size)
        full_ppl, replayed_ppl = perplexity_replay_seconds(model, tokenizer, family, bench.encoded[:64], batch_size,
                                                           layer)
        rows.append({"model": name, "layers": model.config.num_hidden_layers,
                     "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                     "edit_layer": layer, "v_step_plain_s": round(plain, 4), "v_step_cached_s": round(cached, 4),
                     "v_step_speedup": round(plain / cached, 2), "bare_forward_64_texts_s": round(forward, 4),
                     "ppl_full_64_texts_s": round(full_ppl, 4), "ppl_replayed_64_texts_s": round(replayed_ppl, 4),
                     "ppl_replay_speedup": round(full_ppl / replayed_ppl, 2)})
        print(f"  measured {name}", file=sys.stderr)
    return rows


def sharers(bench: Bench, model_name: str, editor_name: str, case: Any) -> list[str]:
    """The available editors whose search for ``case`` on this model is the benchmarked editor's own (equal
    measurement keys, :meth:`editors.base.EditorBase.measurement_key`), the benchmarked one included: in a run that
    certifies them all, the harness searches once per case for all of them. Editors that need a trained network
    are left out rather than trained here."""
    from editors.base import EditRequest, measurement_key
    from editors.provision import set_up
    from editors.registry import available_editors, build_editor
    from pytest_editsafety.organisms import hparams_keys

    loaded = bench.loaded
    request = EditRequest(case.subject, case.prompt, case.target_new)
    resources = bench.resources
    found = []
    own = measurement_key(bench.editors["optimised"], request)
    for name in available_editors():
        editor = build_editor(name, hparams_keys(loaded), loaded.model)
        if editor.needs(loaded.model, loaded.family).trained_network is not None:
            continue
        set_up(editor, loaded.model, loaded.tokenizer, loaded.family, resources)
        if own is not None and measurement_key(editor, request) == own:
            found.append(name)
    return found or [editor_name]


def _editor_layer(editor: Any) -> int:
    hp = editor.hparams
    return hp.layer if hasattr(hp, "layer") else hp.layers[-1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.cases.classify import tag_hardness
    from pytest_editsafety.hub_options import PPL_BATCH_SIZE
    from pytest_editsafety.metrics import probe_before

    bench = _set_up(args.model, args.editor)
    model, tokenizer = bench.loaded.model, bench.loaded.tokenizer
    case_set = tag_hardness(resolve_cases(args.cases), tokenizer)
    cases = list(case_set.cases)[: args.limit]
    per_piece: dict[str, dict[str, list[float]]] = {path: {p: [] for p in PIECES} for path in PATHS}
    # one warm-up case on each path: first calls pay for lazy set-up the steady state does not
    for path in PATHS:
        _certify_pieces(bench, path, cases[0], probe_before(model, tokenizer, cases[0]))
    for index, case in enumerate(cases):
        probe = probe_before(model, tokenizer, case)
        for path in (PATHS if index % 2 == 0 else PATHS[::-1]):
            for piece, seconds in _certify_pieces(bench, path, case, probe).items():
                per_piece[path][piece].append(seconds)
        print(f"  case {index + 1}/{len(cases)}", file=sys.stderr)
    pieces = {path: {p: round(statistics.mean(v), 4) for p, v in per_piece[path].items()} for path in PATHS}
    per_case = {path: round(sum(pieces[path].values()), 4) for path in PATHS}
    bare = min(bare_forward_seconds(model, tokenizer, bench.encoded, PPL_BATCH_SIZE) for _ in range(3))
    # a run certifying every editor that shares this search: one search per case, each editor's other pieces its own
    sharing = sharers(bench, args.model, args.editor, cases[0])
    optimised = pieces["optimised"]
    shared_per_case = (per_case["optimised"] + (len(sharing) - 1) * (per_case["optimised"] - optimised["v_star"])
                       ) / len(sharing)
    result: dict[str, Any] = {
        "model": args.model, "editor": args.editor, "cases": args.cases, "n_cases": len(cases),
        "torch_threads": torch.get_num_threads(), "device": "cpu",
        "pieces_s": pieces,
        "per_case_plain_s": per_case["plain"], "per_case_optimised_s": per_case["optimised"],
        "per_case_speedup": round(per_case["plain"] / per_case["optimised"], 2),
        "v_star_speedup": round(pieces["plain"]["v_star"] / pieces["optimised"]["v_star"], 2),
        "sharing_editors": sharing,
        "per_case_shared_run_s": round(shared_per_case, 4),
        "shared_run_speedup": round(per_case["plain"] / shared_per_case, 2),
        "corpus": bench.corpus.name, "corpus_texts": len(bench.encoded),
        "corpus_tokens": sum(len(ids) for ids in bench.encoded),
        "bare_forward_s": round(bare, 4),
        "ppl_to_bare_forward_ratio": round(pieces["optimised"]["perplexity"] / bare, 3),
    }
    if args.sizes != "none":
        result["sizes"] = measure_sizes(bench, cases[: args.size_cases], args.size_steps, PPL_BATCH_SIZE)
    return result


def _print_table(result: dict[str, Any]) -> None:
    from tabulate import tabulate

    print(f"{result['editor']} on {result['model']}, {result['n_cases']} {result['cases']} cases, "
          f"{result['torch_threads']} torch thread(s): seconds per certified case")
    rows = [[piece, result["pieces_s"]["plain"][piece], result["pieces_s"]["optimised"][piece],
             round(result["pieces_s"]["plain"][piece] / max(result["pieces_s"]["optimised"][piece], 1e-9), 2)]
            for piece in PIECES]
    rows.append(["certified case", result["per_case_plain_s"], result["per_case_optimised_s"],
                 result["per_case_speedup"]])
    print(tabulate(rows, headers=["piece", "plain s", "optimised s", "speed-up"], tablefmt="github"))
    print(f"\nin a run of the {len(result['sharing_editors'])} editors that share this search "
          f"({', '.join(result['sharing_editors'])}), one search per case: {result['per_case_shared_run_s']} s per "
          f"certified case, {result['shared_run_speedup']}x the plain path's {result['per_case_plain_s']} s")
    print(f"\nperplexity over {result['corpus']} ({result['corpus_texts']} texts, {result['corpus_tokens']} tokens): "
          f"{result['pieces_s']['optimised']['perplexity']} s, a bare forward pass {result['bare_forward_s']} s "
          f"(ratio {result['ppl_to_bare_forward_ratio']})")
    if "sizes" in result:
        print("\nas the model grows: one step of the search (seconds), a bare forward pass over 64 texts, and the "
              "perplexity over them after an edit at the edit layer, every block run and the blocks below replayed")
        print(tabulate([[r["model"], r["layers"], r["parameters_m"], r["edit_layer"], r["v_step_plain_s"],
                         r["v_step_cached_s"], r["v_step_speedup"], r["bare_forward_64_texts_s"],
                         r["ppl_full_64_texts_s"], r["ppl_replayed_64_texts_s"], r["ppl_replay_speedup"]]
                        for r in result["sizes"]],
                       headers=["model", "layers", "params (M)", "edit layer", "step plain", "step cached",
                                "speed-up", "forward", "ppl full", "ppl replayed", "speed-up"], tablefmt="github"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-gpt2", help="a built-in organism (default tiny-gpt2)")
    parser.add_argument("--editor", default="rome", help="a ROME- or MEMIT-family editor (default rome)")
    parser.add_argument("--cases", default="hard", help="case set (default hard)")
    parser.add_argument("--limit", type=int, default=8, help="cases timed (default 8)")
    parser.add_argument("--sizes", choices=("all", "none"), default="all",
                        help="also time the search as the model grows (default all)")
    parser.add_argument("--size-steps", type=int, default=3, help="search steps timed per size (default 3)")
    parser.add_argument("--size-cases", type=int, default=2, help="cases per size (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
