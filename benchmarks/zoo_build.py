"""Build the organisms from scratch into a fresh cache and print the figures issue #2 asks for.

    python benchmarks/zoo_build.py                 # every organism once
    python benchmarks/zoo_build.py tiny-gpt2 --twice  # also rebuild and compare weight hashes

Targets (read, not asserted): each build <= 300 s on 2 CPU cores; recall >= 0.8 with the subject first
and later (not for tiny-gpt2-sink, the prototypes' organism, which by design knows few facts whose subject
opens a bare prompt: 0.16 first, 0.71 later); rebuilding gives the same sha256.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from pytest_editsafety.zoo.build import build_recipe, read_metadata, recipe_for
from pytest_editsafety.zoo.recipe import RECIPES

log = logging.getLogger("benchmarks.zoo_build")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=sorted(RECIPES))
    parser.add_argument("--twice", action="store_true", help="build a second time and compare sha256")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="editsafety-bench-") as tmp:
        for name in args.names:
            recipe = recipe_for(name)
            meta = read_metadata(build_recipe(recipe, root=Path(tmp) / "first"))
            row = {k: meta[k] for k in ("build_seconds", "train_seconds", "heldout_ppl", "causal_layer", "weights_sha256")}
            row.update(meta["knowledge"])
            row["ablation_drop_at_causal_layer"] = meta["ablation"]["drop_by_layer"][meta["causal_layer"]]
            if args.twice:
                again = read_metadata(build_recipe(recipe, root=Path(tmp) / "second"))
                row["rebuild_identical"] = again["weights_sha256"] == meta["weights_sha256"]
                row["rebuild_seconds"] = again["build_seconds"]
            rows[name] = row
            log.info("%s: %s", name, json.dumps(row))
    print(json.dumps(rows, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
