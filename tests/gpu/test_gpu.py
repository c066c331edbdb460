"""The GPU check (issue 15): the organism on a CUDA device loads in bfloat16 and float16, measures the same
perplexity as on the CPU, and is edited and restored bit-exactly there, the whole-model fingerprint included.

Marked ``gpu``. Without CUDA the module is skipped, so ``make test`` stays as it was on CPU-only machines;
``GPU_CHECK_ALLOW_CPU=1`` runs the same checks on the CPU instead (the plumbing of
``benchmarks/gpu_check.sh --cpu``), where "device vs CPU" compares the CPU with itself.

Tolerances (measured on the organism, 500 sentences of ``organism-ppl``; the CPU reference is float32):

* float32 on the device: every per-sentence perplexity and the mean and corpus perplexities within a relative
  ``FP32_RTOL`` = 1e-4. Only the reduction order of the matmuls differs (TF32 is off for float32 matmuls by
  default), which moves a perplexity by about 1e-6.
* bfloat16 / float16: the mean and corpus perplexities within ``HALF_RTOL`` = 1e-2 and each sentence within
  ``HALF_SENTENCE_RTOL`` = 0.1. On the CPU, bfloat16 against float32 moved the corpus perplexity by 1.1e-4 and
  one sentence by at most 1.3e-2 (float16: 5.9e-5 and 2.3e-3); the bounds leave room for the device's own
  half-precision kernels, and still catch a model that lost its weights (perplexity in the hundreds or more).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

ALLOW_CPU_ENV = "GPU_CHECK_ALLOW_CPU"
FP32_RTOL = 1e-4
HALF_RTOL = 1e-2
HALF_SENTENCE_RTOL = 0.1
MODEL = "tiny-gpt2"
HALF_DTYPES = ("bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_device() -> str:
    """Where the checks run: ``cuda:0`` (this process's first GPU), or the CPU when allowed; else skip."""
    if torch.cuda.is_available():
        return "cuda:0"
    if os.environ.get(ALLOW_CPU_ENV, "").strip() == "1":
        return "cpu"
    pytest.skip(
        f"needs CUDA (torch.cuda.is_available() is False; torch {torch.__version__}, CUDA build "
        f"{torch.version.cuda or 'none'}): run benchmarks/gpu_check.sh on a GPU machine, or set "
        f"{ALLOW_CPU_ENV}=1 to run these checks on the CPU",
        allow_module_level=True,
    )
    raise AssertionError("unreachable")  # pytest.skip raises


DEVICE = _check_device()

pytestmark = [pytest.mark.gpu, pytest.mark.organism, pytest.mark.xdist_group(MODEL)]


def _load(dtype: str, device: str) -> Any:
    """The organism in ``dtype`` on ``device``, placed as the hub places a model without a device map."""
    from pytest_editsafety.registry import LoadOptions, load_model

    loaded = load_model(MODEL, LoadOptions(dtype=dtype))
    loaded.model.to(device)
    return loaded


def _perplexity(loaded: Any, texts: tuple[str, ...]) -> Any:
    from pytest_editsafety.perplexity import perplexity

    return perplexity(loaded.model, loaded.tokenizer, texts)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def corpus_texts() -> tuple[str, ...]:
    from pytest_editsafety.zoo.corpus import perplexity_corpus

    return tuple(perplexity_corpus().texts)


@pytest.fixture(scope="module")
def cpu_reference(corpus_texts: tuple[str, ...]) -> Any:
    """The organism's perplexity in float32 on the CPU, the figure every device measurement is held to."""
    loaded = _load("float32", "cpu")
    return _perplexity(loaded, corpus_texts)


@pytest.fixture(scope="module")
def cache_root() -> Any:
    from pytest_editsafety.cache import cache_root as root

    return root()


def _set_up_editor(name: str, loaded: Any, root: Any) -> Any:
    """``name`` configured for the organism and set up as the harness does it (C over the organism's held-out
    text, cached under the cache root; context templates sampled from the model on its device)."""
    from editors.provision import set_up
    from editors.registry import build_editor
    from editors.stats import SecondMomentCache
    from pytest_editsafety.corpora import resolve_corpus
    from pytest_editsafety.organisms import hparams_keys
    from pytest_editsafety.plan import ORGANISM_STATS_CORPUS
    from pytest_editsafety.resources import ModelResources

    editor = build_editor(name, hparams_keys(loaded), loaded.model)
    resources = ModelResources(loaded, cache_root=root, stats_corpus=resolve_corpus(ORGANISM_STATS_CORPUS),
                               stats_cache=SecondMomentCache(root / "stats"))
    set_up(editor, loaded.model, loaded.tokenizer, loaded.family, resources)
    return editor


def _all_tensors(model: Any) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


@pytest.fixture(scope="module")
def float32_on_device() -> Iterator[Any]:
    loaded = _load("float32", DEVICE)
    yield loaded
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# (a) loading in half precision on the device


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_the_organism_loads_in_half_precision_on_the_device(dtype: str, corpus_texts, cpu_reference) -> None:
    loaded = _load(dtype, DEVICE)
    expected = TORCH_DTYPES[dtype]
    floating = {name: t for name, t in _all_tensors(loaded.model).items() if t.is_floating_point()}
    assert floating, "the model has no floating-point tensors"
    wrong_dtype = sorted(name for name, t in floating.items() if t.dtype != expected)
    wrong_place = sorted(name for name, t in _all_tensors(loaded.model).items() if t.device != torch.device(DEVICE))
    assert not wrong_dtype, f"{dtype} load left tensors in another dtype: {wrong_dtype[:5]}"
    assert not wrong_place, f"tensors not on {DEVICE}: {wrong_place[:5]}"

    # (c) for half precision: the same corpus, a looser tolerance than float32's
    got = _perplexity(loaded, corpus_texts)
    assert got.n_tokens == cpu_reference.n_tokens
    for figure in ("mean_ppl", "corpus_ppl"):
        rel = _rel(getattr(got, figure), getattr(cpu_reference, figure))
        assert rel <= HALF_RTOL, (
            f"{dtype} on {DEVICE}: {figure} {getattr(got, figure):.6g} vs float32 CPU "
            f"{getattr(cpu_reference, figure):.6g}: relative difference {rel:.3g} > {HALF_RTOL}"
        )
    worst = max(_rel(a, b) for a, b in zip(got.per_sentence, cpu_reference.per_sentence, strict=True))
    assert worst <= HALF_SENTENCE_RTOL, f"{dtype} on {DEVICE}: a sentence's perplexity differs by {worst:.3g}"


# --------------------------------------------------------------------------------------------------
# (c) perplexity in float32 on the device equals the CPU's


def test_float32_perplexity_on_the_device_equals_the_cpu(float32_on_device, corpus_texts, cpu_reference) -> None:
    got = _perplexity(float32_on_device, corpus_texts)
    assert got.n_sentences == cpu_reference.n_sentences and got.n_tokens == cpu_reference.n_tokens
    for figure in ("mean_ppl", "corpus_ppl", "median_ppl", "max_ppl"):
        rel = _rel(getattr(got, figure), getattr(cpu_reference, figure))
        assert rel <= FP32_RTOL, (
            f"float32 on {DEVICE}: {figure} {getattr(got, figure):.8g} vs CPU {getattr(cpu_reference, figure):.8g}: "
            f"relative difference {rel:.3g} > {FP32_RTOL}"
        )
    worst = max(_rel(a, b) for a, b in zip(got.per_sentence, cpu_reference.per_sentence, strict=True))
    assert worst <= FP32_RTOL, f"float32 on {DEVICE}: a sentence's perplexity differs by {worst:.3g} > {FP32_RTOL}"


# --------------------------------------------------------------------------------------------------
# (b) + (d) an edit on the device, then the restore: bit-exact, and the whole-model fingerprint holds


def _edit_and_restore(loaded: Any, editor_name: str, root: Any) -> None:
    from editors.base import EditRequest
    from editors.fingerprint import ModelFingerprint
    from editors.restore import bitwise_equal, edit_session
    from pytest_editsafety.cases import resolve_cases

    model, family = loaded.model, loaded.family
    editor = _set_up_editor(editor_name, loaded, root)
    reference = ModelFingerprint.of(model, "full")
    before = {name: t.detach().clone() for name, t in _all_tensors(model).items()}
    touched = editor.parameters_touched(model, family)
    assert touched, f"{editor_name} declares no parameters"
    case = resolve_cases("normal").cases[0]
    request = EditRequest(case.subject, case.prompt, case.target_new)

    with edit_session(model, touched, reference=reference, editor=editor_name):
        outcome = editor.apply(model, loaded.tokenizer, family, [request])
        live = _all_tensors(model)
        changed = [name for name in outcome.edited if not torch.equal(live[name], before[name])]
        # the edit really ran, on the device, and wrote finite numbers
        assert changed, f"{editor_name} changed none of {outcome.edited}"
        for name in changed:
            assert live[name].device == torch.device(DEVICE), f"{name} left {DEVICE} during the edit"
            assert torch.isfinite(live[name].float()).all(), f"{name}: non-finite values after the edit"
    # edit_session restored the declared tensors and checked the whole model against `reference`
    after = _all_tensors(model)
    assert sorted(after) == sorted(before)
    different = [name for name, t in after.items()
                 if not (torch.equal(t, before[name]) and bitwise_equal(t, before[name]))]
    assert not different, f"{editor_name} on {DEVICE}: not restored bit-exactly: {different}"
    assert not reference.changes(model), "the whole-model fingerprint differs after the restore"


@pytest.mark.parametrize("editor_name", ["c-rome", "rome"])
def test_edit_and_restore_bit_exact_on_the_device_float32(editor_name: str, float32_on_device, cache_root) -> None:
    _edit_and_restore(float32_on_device, editor_name, cache_root)


def test_edit_and_restore_bit_exact_on_the_device_bfloat16(cache_root) -> None:
    # half-precision weights are written back through a float32 update: the restore must still be exact
    _edit_and_restore(_load("bfloat16", DEVICE), "c-rome", cache_root)


def test_the_fingerprint_on_the_device_sees_an_undeclared_change(float32_on_device) -> None:
    """(d) the device's integer checksum is not blind: one word of an undeclared tensor changed is named."""
    from editors.fingerprint import ModelFingerprint, UndeclaredChangeError

    model = float32_on_device.model
    reference = ModelFingerprint.of(model, "full")
    # an attention weight: tied to nothing, and no editor here declares it
    name, weight = next((n, p) for n, p in model.named_parameters() if p.dim() == 2 and "attn" in n)
    with torch.no_grad():
        saved = weight[0, 0].clone()
        weight[0, 0] = torch.nextafter(saved, saved + 1)  # the smallest change a float32 can make
        try:
            with pytest.raises(UndeclaredChangeError, match=name.replace(".", r"\.")):
                reference.check(model, editor="gpu-check")
        finally:
            weight[0, 0] = saved
    reference.check(model, editor="gpu-check")


# --------------------------------------------------------------------------------------------------
# perplexity after an edit above the first blocks replays their recorded output on the device too


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_replayed_perplexity_on_the_device_is_the_full_passs(dtype: str, corpus_texts) -> None:
    """An edit of layer 3's MLP: the per-sentence NLLs with blocks 0-2 replayed (pytest_editsafety.lower_blocks)
    equal the full pass's on the device, the first measurement recording and the second replaying."""
    from editors.restore import edit_session
    from pytest_editsafety.lower_blocks import LowerBlockStore, lowest_block
    from pytest_editsafety.perplexity import sentence_nlls

    loaded = _load(dtype, DEVICE)
    model, family = loaded.model, loaded.family
    edited = family.layer_name("mlp_out", 3) + ".weight"
    layer = lowest_block(family, [edited], loaded.n_layers)
    store = LowerBlockStore()
    lower = store.outputs(model, family, "organism-ppl", 32, layer)
    texts = corpus_texts[:200]
    weight = dict(model.named_parameters())[edited]
    with edit_session(model, [edited]):
        with torch.no_grad():
            weight.mul_(1.5)
        full = sentence_nlls(model, loaded.tokenizer, texts, batch_size=32)
        for _ in range(2):
            replayed = sentence_nlls(model, loaded.tokenizer, texts, batch_size=32, lower_blocks=lower)
            worst = max(abs(a - b) / max(abs(b), 1e-12) for (a, _), (b, _) in zip(replayed, full, strict=True))
            assert worst <= 1e-6, f"{dtype} on {DEVICE}: a replayed sentence's NLL differs by {worst:.3g}"
    assert lower.replayed_batches == -(-len(texts) // 32) and store.used_bytes > 0
    del loaded
