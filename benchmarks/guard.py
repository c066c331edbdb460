"""How well the pre-flight guard predicts certification, and what it costs: prints figures.

Certifies ``--editor`` on ``--model`` over ``--cases`` (every case edited, measured and restored, as the plugin
does), then asks the guard about the same edits before any weight moves, for several floor fractions. Printed per
fraction: recall of the cases certification fails on perplexity (overall, and among subject-first cases),
precision of the refusals, the share of normal cases refused, and the guard's seconds per request against one
certification test's.

    python benchmarks/guard.py [--model tiny-gpt2] [--editor rome] [--cases hard,normal] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--editor", default="rome")
    parser.add_argument("--cases", default="hard,normal")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from pytest_editsafety.api import certify, guard

    torch.set_num_threads(1)  # the certification's own timing convention on a shared CPU
    certificate = certify(args.model, None, args.editor, args.cases)
    verdict = {(r.subject, r.prompt, r.target_new): r for r in certificate.cases}
    decisions = guard(args.model, None, args.editor, args.cases)
    median = decisions[0].floor / 0.5
    rows = []
    for d in decisions:
        record = verdict[(d.subject, d.prompt, d.target_new)]
        ppl_failed = any("perplexity" in v for v in record.violations)
        rows.append((d.denominator, d.subject_first, ppl_failed, record.case_set))
    failed = [r for r in rows if r[2]]
    figures = {"model": args.model, "editor": args.editor, "cases": len(rows), "ppl_failures": len(failed),
               "ppl_failures_subject_first": sum(r[1] for r in failed), "median_denominator": median,
               "guard_seconds_per_request": statistics.median(d.seconds for d in decisions),
               "certification_seconds_per_test": statistics.median(r.duration_s for r in certificate.cases),
               "fractions": []}
    for fraction in FRACTIONS:
        refused = [r for r in rows if r[0] < fraction * median]
        caught = [r for r in failed if r[0] < fraction * median]
        first = [r for r in failed if r[1]]
        normal = [r for r in rows if not r[1]]
        figures["fractions"].append({
            "fraction": fraction,
            "recall": len(caught) / len(failed) if failed else float("nan"),
            "recall_subject_first": sum(r[1] for r in caught) / len(first) if first else float("nan"),
            "precision": sum(r[2] for r in refused) / len(refused) if refused else float("nan"),
            "normal_refused": sum(1 for r in normal if r[0] < fraction * median) / len(normal) if normal else 0.0,
        })
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{args.editor} on {args.model}: {len(rows)} cases, {len(failed)} fail certification on perplexity "
          f"({figures['ppl_failures_subject_first']} subject-first); median |uᵀk| {median:.4g}")
    print(f"guard {figures['guard_seconds_per_request']:.4f} s/request, certification "
          f"{figures['certification_seconds_per_test']:.3f} s/test "
          f"({figures['guard_seconds_per_request'] / figures['certification_seconds_per_test']:.1%})")
    for f in figures["fractions"]:
        print(f"  floor {f['fraction']:.1f} x median: recall {f['recall']:.3f} (subject-first "
              f"{f['recall_subject_first']:.3f}), precision {f['precision']:.3f}, normal refused {f['normal_refused']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
