"""How well the pre-flight guard predicts certification, and what it costs: prints figures.

Certifies ``--editor`` on ``--model`` over ``--cases`` (every case edited, measured and restored, as the plugin
does), then asks the guard about the same edits before any weight moves. Printed for the guard's defaults, for the
denominator floor alone at several fractions and for the interference limit alone at several factors: recall of the
cases certification fails on perplexity (overall, and among subject-first cases), precision of the refusals, the
share of normal cases refused; the guard's seconds per request against one certification test's, and what building
a ``Guard`` on the loaded model costs once (the editor's set-up and the floor: what every ``guard()`` call pays).

    python benchmarks/guard.py [--model tiny-gpt2] [--editor rome] [--cases hard,normal] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

FRACTIONS = (0.3, 0.5, 0.7, 0.9)
FACTORS = (1.25, 1.5, 1.75, 2.0, 2.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--editor", default="rome")
    parser.add_argument("--cases", default="hard,normal")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import time

    from pytest_editsafety.api import GUARD_INTERFERENCE_FACTOR, Guard, certify
    from pytest_editsafety.registry import load_model

    torch.set_num_threads(1)  # the certification's own timing convention on a shared CPU
    certificate = certify(args.model, None, args.editor, args.cases)
    verdict = {(r.subject, r.prompt, r.target_new): r for r in certificate.cases}
    loaded = load_model(args.model)  # a platform's model in hand
    started = time.perf_counter()
    gate = Guard(loaded.model, loaded.tokenizer, args.editor)
    setup_seconds = time.perf_counter() - started
    decisions = gate.check(args.cases)
    median = decisions[0].floor / 0.5
    limit = decisions[0].interference_limit
    interference_median = None if limit is None else limit / GUARD_INTERFERENCE_FACTOR
    rows = []
    for d in decisions:
        record = verdict[(d.subject, d.prompt, d.target_new)]
        rows.append({"denominator": d.denominator, "interference": d.measures.get("interference", math.nan),
                     "subject_first": d.subject_first, "normal": record.case_set.startswith("normal"),
                     "ppl_failed": any("perplexity" in v for v in record.violations), "refused": not d.allowed})
    failed = [r for r in rows if r["ppl_failed"]]
    figures = {"model": args.model, "editor": args.editor, "cases": len(rows), "ppl_failures": len(failed),
               "ppl_failures_subject_first": sum(r["subject_first"] for r in failed), "median_denominator": median,
               "median_interference": interference_median,
               "guard_setup_seconds": setup_seconds,
               "guard_seconds_per_request": statistics.median(d.seconds for d in decisions),
               "certification_seconds_per_test": statistics.median(r.duration_s for r in certificate.cases),
               "default": _scores(rows, [r["refused"] for r in rows]), "fractions": [], "interference_factors": []}
    for fraction in FRACTIONS:  # the denominator floor alone
        refused = [r["denominator"] < fraction * median for r in rows]
        figures["fractions"].append({"fraction": fraction, **_scores(rows, refused)})
    if interference_median is not None:
        for factor in FACTORS:  # the interference limit alone
            refused = [not r["interference"] <= factor * interference_median for r in rows]
            figures["interference_factors"].append({"factor": factor, **_scores(rows, refused)})
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{args.editor} on {args.model}: {len(rows)} cases, {len(failed)} fail certification on perplexity "
          f"({figures['ppl_failures_subject_first']} subject-first); median |uᵀk| {median:.4g}, median "
          f"interference {interference_median if interference_median is None else f'{interference_median:.4g}'}")
    print(f"guard set-up (editor, floor; once per Guard, in every guard() call) {setup_seconds:.2f} s, then "
          f"{figures['guard_seconds_per_request']:.4f} s/request, certification "
          f"{figures['certification_seconds_per_test']:.3f} s/test "
          f"({figures['guard_seconds_per_request'] / figures['certification_seconds_per_test']:.1%})")
    print(f"  the guard's defaults (floor 0.5 x median, interference {GUARD_INTERFERENCE_FACTOR:g} x median): "
          + _line(figures["default"]))
    for f in figures["fractions"]:
        print(f"  floor {f['fraction']:.1f} x median |uᵀk| alone: " + _line(f))
    for f in figures["interference_factors"]:
        print(f"  interference above {f['factor']:.2f} x median alone: " + _line(f))
    return 0


def _scores(rows: list[dict], refused: list[bool]) -> dict[str, float]:
    """Recall of the perplexity failures (overall, subject-first), precision, and the normal cases refused."""
    failed = [r for r in rows if r["ppl_failed"]]
    caught = [r for r, no in zip(rows, refused) if no and r["ppl_failed"]]
    first = [r for r in failed if r["subject_first"]]
    normal = [no for r, no in zip(rows, refused) if r["normal"]]
    return {
        "refused": sum(refused),
        "recall": len(caught) / len(failed) if failed else math.nan,
        "recall_subject_first": sum(r["subject_first"] for r in caught) / len(first) if first else math.nan,
        "precision": len(caught) / sum(refused) if any(refused) else math.nan,
        "normal_refused": sum(normal) / len(normal) if normal else 0.0,
    }


def _line(f: dict) -> str:
    return (f"refused {f['refused']}, recall {f['recall']:.3f} (subject-first {f['recall_subject_first']:.3f}), "
            f"precision {f['precision']:.3f}, normal refused {f['normal_refused']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
