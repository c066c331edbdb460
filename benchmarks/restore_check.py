"""What the whole-model restore check costs per test (issue 16): ms per check on tiny-gpt2 and on GPT-2 124M.

    python benchmarks/restore_check.py                    # tiny-gpt2 (the cached organism) and GPT-2 124M
    python benchmarks/restore_check.py --models gpt2-124m --device cuda --dtype bfloat16

GPT-2 124M is ``GPT2LMHeadModel(GPT2Config())`` with random weights (nothing downloaded); ``gptj-6b`` is the same
for GPT-J 6B's configuration (24 GB in float32: for a GPU, in bfloat16). Printed per model and mode: the
fingerprint taken at load, one check after a restore (the per-test cost), and for scale a sha256 of every
tensor (``editors.restore.model_digest``, CPU only) and one forward pass over 8 sequences of 64 tokens (fewer
where the model's context is shorter) (a
test runs many: the perplexity corpus, the metrics, the edit's own optimisation). Best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from editors.fingerprint import ModelFingerprint
from editors.restore import model_digest


def _best_ms(fn: Callable[[], Any], repeat: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 2)


def _model(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if name == "tiny-gpt2":
        from pytest_editsafety.registry import load_model

        model = load_model(name).model
    else:
        from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM

        torch.manual_seed(0)
        with device:  # initialised where it will run: a 6B model is not built on a CPU first
            if name == "gpt2-124m":
                model = GPT2LMHeadModel(GPT2Config())
            elif name == "gptj-6b":
                model = GPTJForCausalLM(GPTJConfig())
            else:
                raise SystemExit(f"unknown model {name!r}: tiny-gpt2, gpt2-124m or gptj-6b")
    return model.to(device=device, dtype=dtype).eval()


def bench(name: str, dtype: torch.dtype, device: torch.device, repeat: int) -> dict[str, Any]:
    model = _model(name, dtype, device)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    row: dict[str, Any] = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
        "tensors": len(tensors), "parameters": sum(p.numel() for p in model.parameters()),
        "mbytes": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 1),
    }
    for mode in ("full", "sampled"):
        row[f"{mode}_fingerprint_ms"] = _best_ms(lambda mode=mode: ModelFingerprint.of(model, mode), repeat, device)
        reference = ModelFingerprint.of(model, mode)
        assert not reference.changes(model)
        row[f"{mode}_check_ms"] = _best_ms(lambda reference=reference: reference.changes(model), repeat, device)
    if device.type == "cpu":
        row["sha256_model_digest_ms"] = _best_ms(lambda: model_digest(model), max(1, repeat // 2), device)
    config = model.config
    length = min(64, getattr(config, "n_positions", None) or config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (8, length), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        row[f"forward_8x{length}_ms"] = forward = _best_ms(lambda: model(ids), repeat, device)
    row["full_check_per_forward"] = round(row["full_check_ms"] / forward, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["tiny-gpt2", "gpt2-124m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = {}
    for name in args.models:
        rows[name] = bench(name, dtype, device, args.repeat)
        print(f"{name}: full check {rows[name]['full_check_ms']} ms, sampled check {rows[name]['sampled_check_ms']} "
              f"ms per test ({rows[name]['mbytes']} MB, {rows[name]['tensors']} tensors, {device})", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
