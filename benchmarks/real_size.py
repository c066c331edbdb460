"""Certification at real size (issue 15): ``rome`` on GPT-2 124M and GPT-2-XL configurations, through ``certify``.

    python benchmarks/real_size.py                                   # gpt2, 2 normal cases, float32
    python benchmarks/real_size.py --models gpt2 --dtype bfloat16
    python benchmarks/real_size.py --models gpt2-xl --cases 1 --json

Nothing is downloaded: each model is ``GPT2LMHeadModel(GPT2Config(...))`` with seeded random weights, GPT-2's
(n_layer 12, n_embd 768, n_head 12, n_positions 1024) or GPT-2-XL's (48, 1600, 25, 1024), driven by the model
organism's tokenizer (no GPT-2 tokenizer is available offline), so the vocabulary is that tokenizer's length
(``--real-vocab``: GPT-2's 50257 rows, of which the tokenizer uses the first ones; the parameter count is then
the real model's). ``config._name_or_path`` is ``gpt2-random`` / ``gpt2-xl-random``, and ROME's hyper-parameters
are the real model's file, ``editors/hparams/rome/gpt2-xl.json`` (layer 17, 20 v* steps, C = I), with
``layer`` 5 on GPT-2 small (12 layers: layer 17 does not exist there; the README's figures were measured at 5,
while a real ``gpt2`` run edits layer 4, the GPT-2 family default's '17/48'). The cases are the organism's ``normal``
set (first ``--cases``), the perplexity corpus the first ``--corpus-texts`` texts of ``organism-heldout``,
written as an ME-PPL JSON file to a temporary directory; every cache goes to that directory too.

The denominator floor (ROME's median |uᵀk| over the 176 ``real-normal`` reference cases) is a one-off cost per
model, cached on disk in ordinary runs; it is off here (``min_denominator_fraction`` 0) unless ``--floor``.

Each model runs in a subprocess of its own, so memory peaks do not mix. Printed per model: parameters and weight
bytes, the median seconds per certification test (``duration_s`` of each record: the first also carries the
baseline perplexity and the editor's set-up, i.e. the context templates it samples), the certify wall time, and
resident memory: the process's before the model was built (Python, torch), after it, and its peak during
``certify`` (the kernel's VmHWM, reset with ``/proc/self/clear_refs`` before certify; where that cannot be reset,
``ru_maxrss``, which may then include the build). ``peak / weights`` is (peak - runtime) / weight bytes: 1.0 is
the model alone; the target is ≤ 1.2 plus activations (no copy of the model or of the edited tensors beyond the
restore snapshot). glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in its heap,
so by default the child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: freed tensors return to the system and the
peak is memory that was live at once (``--glibc-default`` measures the default allocator: on GPT-2 124M float32
its heap keeps ~0.5 GiB of v*'s freed activations).
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 1024},
}
GPT2_VOCAB = 50257
HPARAMS_FILE = ROOT / "editors" / "hparams" / "rome" / "gpt2-xl.json"
# the edit layer on GPT-2 small, where GPT-2-XL's file's 17 does not exist (kept at 5, where the README's figures
# were measured; the family default's '17/48' gives 4)
LAYER = {"gpt2": 5, "gpt2-xl": 17}


def _organism_tokenizer_dir() -> Path:
    base = Path(os.environ.get("EDITSAFETY_CACHE", Path.home() / ".cache" / "pytest-editsafety"))
    found = sorted(d for d in glob.glob(str(base / "organisms" / "tiny-gpt2-*"))
                   if Path(d, "tokenizer.json").exists() and "sink" not in Path(d).name)
    if not found:
        raise SystemExit(f"no tiny-gpt2 organism under {base / 'organisms'}: build it first (make organisms)")
    return Path(found[0])


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _write_corpus(directory: Path, n_texts: int) -> Path:
    from pytest_editsafety.corpora import resolve_corpus

    heldout = resolve_corpus("organism-heldout")
    entries = [{"Text": text, "Corpus": "organism-heldout"} for text in heldout.texts[:n_texts]]
    path = directory / "real-size-ppl.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One model in this process: build it, certify ``rome`` on it, measure."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from pytest_editsafety.api import certify
    from pytest_editsafety.bounds import Bounds

    name, dtype = args.child, getattr(torch, args.dtype)
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(_organism_tokenizer_dir())
    gc.collect()
    rss_runtime = _rss_kib("VmRSS")

    vocab = GPT2_VOCAB if args.real_vocab else len(tokenizer)
    config = GPT2Config(vocab_size=vocab, **CONFIGS[name])
    config._name_or_path = f"{name}-random"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = GPT2LMHeadModel(config).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    gc.collect()
    rss_model = _rss_kib("VmRSS")

    hparams = json.loads(HPARAMS_FILE.read_text())
    hparams.pop("_comment", None)
    hparams["layer"] = LAYER[name]
    if args.v_steps is not None:
        hparams["v_num_grad_steps"] = args.v_steps
    bounds = Bounds() if args.floor else Bounds(min_denominator_fraction=0.0)

    with tempfile.TemporaryDirectory(prefix="editsafety-real-size-") as tmp:
        corpus = _write_corpus(Path(tmp), args.corpus_texts)
        reset = _reset_peak()
        t0 = time.perf_counter()
        certificate = certify(model, tokenizer, "rome", "normal", limit=args.cases, hparams=hparams,
                              corpus=str(corpus), bounds=bounds, cache_root=str(Path(tmp) / "cache"))
        certify_s = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    records = list(certificate.cases)
    durations = [r.duration_s for r in records]
    errors = [v for r in records for v in r.violations if v.startswith("error")]
    weights_kib = weight_bytes / 1024
    return {
        "model": name, "dtype": args.dtype, "layer": LAYER[name], "v_num_grad_steps": hparams["v_num_grad_steps"],
        "vocab": vocab, "params": n_params, "weight_bytes": weight_bytes,
        "cases": len(records), "certified_cases": sum(bool(r.certified) for r in records), "errors": errors,
        "ppl_ratios": [r.metrics.get("ppl_ratio") for r in records],
        "seconds_per_case_median": statistics.median(durations) if durations else None,
        "seconds_per_case": durations, "certify_s": certify_s, "build_s": build_s,
        "rss_runtime_mib": rss_runtime / 1024, "rss_model_mib": rss_model / 1024,
        "rss_peak_mib": peak / 1024, "peak_reset": reset,
        "peak_over_weights": (peak - rss_runtime) / weights_kib,
        "peak_over_model_rss": (peak - rss_runtime) / max(1, rss_model - rss_runtime),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "malloc": "glibc default" if "MALLOC_MMAP_THRESHOLD_" not in os.environ else
                  f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}",
    }


def _line(r: dict[str, Any]) -> str:
    if "failed" in r:
        return f"{r['model']:8} {r['dtype']:9} FAILED: {r['failed']}"
    ratios = ", ".join(f"{x:.3g}" for x in r["ppl_ratios"] if x is not None) or "-"
    return (f"{r['model']:8} {r['dtype']:9} {r['params'] / 1e6:8.1f}M {r['weight_bytes'] / 2**20:9.0f} MiB "
            f"{r['cases']:3d} cases {r['seconds_per_case_median']:8.1f} s/case (certify {r['certify_s']:.0f} s) "
            f"RSS runtime {r['rss_runtime_mib']:.0f} MiB, +model {r['rss_model_mib']:.0f}, peak "
            f"{r['rss_peak_mib']:.0f} MiB: peak/weights {r['peak_over_weights']:.2f}x"
            f"{'' if r['peak_reset'] else ' (ru_maxrss)'} [{r['malloc']}]; ppl ratio {ratios}"
            + (f"; errors: {r['errors']}" if r["errors"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2", help="comma-separated: gpt2, gpt2-xl (default gpt2)")
    parser.add_argument("--cases", type=int, default=2, help="normal cases certified per model (default 2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--corpus-texts", type=int, default=20, help="perplexity texts (default 20)")
    parser.add_argument("--v-steps", type=int, default=None, help="override v_num_grad_steps (default the file's)")
    parser.add_argument("--real-vocab", action="store_true", help=f"{GPT2_VOCAB} embedding rows, as GPT-2's")
    parser.add_argument("--floor", action="store_true", help="include the denominator floor (176 reference cases)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per model before it is stopped")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc as it is (default: MALLOC_MMAP_THRESHOLD_=65536 in the child, so "
                             "freed tensors go back to the system and the peak is what was live, not the heap's cache)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    hardware = f"CPU ({os.cpu_count()} cores)"
    if not args.json:
        print(f"rome through certify(), {args.cases} normal case(s), {args.corpus_texts} ppl texts, {hardware}")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in CONFIGS:
            raise SystemExit(f"unknown model {name!r}: {', '.join(CONFIGS)}")
        argv = [sys.executable, __file__, "--child", name, "--dtype", args.dtype, "--cases", str(args.cases),
                "--corpus-texts", str(args.corpus_texts)]
        argv += ["--real-vocab"] * args.real_vocab + ["--floor"] * args.floor
        argv += ["--v-steps", str(args.v_steps)] if args.v_steps is not None else []
        try:
            env = dict(os.environ)
            if not args.glibc_default:
                env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][len("RESULT "):])
            else:
                result = {"model": name, "dtype": args.dtype,
                          "failed": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        except subprocess.TimeoutExpired:
            result = {"model": name, "dtype": args.dtype, "failed": f"timed out after {args.timeout} s"}
        result["hardware"] = hardware
        print(json.dumps(result) if args.json else _line(result), flush=True)


if __name__ == "__main__":
    main()
