"""The whole-model restore check (issue 16): a fingerprint of every parameter and buffer taken at load, checked
after every restore, so an editor that writes outside ``parameters_touched`` fails its own test, naming the
tensor, instead of silently corrupting every later test of the worker.

First the fingerprint on small GPT-2/GPT-J/Llama models built from configs (random weights, no download), then
the hub on a micro organism with throwaway editors registered through the editors' entry point.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from editors.fingerprint import (
    FINGERPRINT_MODES,
    ModelFingerprint,
    UndeclaredChangeError,
    _checksum,
    _sample_positions,
    _words,
)
from editors.restore import RestoreError, edit_session, named_parameter
from tests.editor_packages import write_editor_package

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECLARED = "transformer.h.1.mlp.c_proj.weight"
UNDECLARED = "transformer.h.0.attn.c_attn.weight"


def _gpt2(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, **overrides)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture()
def model() -> GPT2LMHeadModel:
    return _gpt2()


def _changed(fingerprint: ModelFingerprint, model: torch.nn.Module, **kwargs) -> dict[str, str]:
    return {c.name: c.what for c in fingerprint.changes(model, **kwargs)}


# ---------------------------------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("mode", FINGERPRINT_MODES)
def test_an_untouched_model_matches_and_a_declared_edit_passes(model, mode) -> None:
    reference = ModelFingerprint.of(model, mode)
    assert set(reference.names) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert reference.changes(model) == []
    with edit_session(model, [DECLARED], reference=reference, editor="good"):
        with torch.no_grad():
            named_parameter(model, DECLARED).add_(1.0)
    assert reference.changes(model) == []


@pytest.mark.parametrize("mode", FINGERPRINT_MODES)
def test_an_undeclared_write_fails_naming_the_tensor_and_the_editor(model, mode) -> None:
    reference = ModelFingerprint.of(model, mode)
    with pytest.raises(UndeclaredChangeError) as info:
        with edit_session(model, [DECLARED], reference=reference, editor="sloppy"):
            with torch.no_grad():
                named_parameter(model, DECLARED).add_(1.0)
                named_parameter(model, UNDECLARED).mul_(1.5)
    err = info.value
    assert isinstance(err, RestoreError)  # the hub's RestoreError handling (evict) applies
    assert err.editor == "sloppy" and err.tensors == (UNDECLARED,)
    assert str(err).startswith(f"editor 'sloppy' changed {UNDECLARED} (values")
    assert f"which it does not declare in parameters_touched (it declares {DECLARED})" in str(err)
    # the declared tensor was restored as usual; only the undeclared one is left changed
    assert _changed(reference, model) == {UNDECLARED: err.changes[0].what}


def test_the_check_runs_after_a_failing_body_and_chains_its_exception(model) -> None:
    reference = ModelFingerprint.of(model)
    with pytest.raises(UndeclaredChangeError, match=UNDECLARED) as info:
        with edit_session(model, [DECLARED], reference=reference, editor="sloppy"):
            with torch.no_grad():
                named_parameter(model, UNDECLARED).zero_()
            raise ZeroDivisionError("the edit failed half-way")
    assert isinstance(info.value.__context__, ZeroDivisionError)


def test_tied_weights_follow_the_declared_tensor(model) -> None:
    reference = ModelFingerprint.of(model)
    assert named_parameter(model, "lm_head.weight") is named_parameter(model, "transformer.wte.weight")
    # declared under one name: the restore covers the other name too
    with edit_session(model, ["transformer.wte.weight"], reference=reference, editor="good"):
        with torch.no_grad():
            named_parameter(model, "lm_head.weight").add_(1.0)
    # undeclared: both names are reported
    with pytest.raises(UndeclaredChangeError) as info:
        with edit_session(model, [DECLARED], reference=reference, editor="sloppy"):
            with torch.no_grad():
                named_parameter(model, "transformer.wte.weight")[3].neg_()
    assert set(info.value.tensors) == {"transformer.wte.weight", "lm_head.weight"}


def _replace(model):
    model.transformer.h[0].attn.c_attn.weight = torch.nn.Parameter(model.transformer.h[0].attn.c_attn.weight.clone())


def _new_storage(model):
    p = named_parameter(model, UNDECLARED)
    p.data = p.data.clone()


def _retype(model):
    p = named_parameter(model, UNDECLARED)
    p.data = p.data.to(torch.float64)


def _grad(model):
    p = named_parameter(model, UNDECLARED)
    p.grad = torch.zeros_like(p)


def _freeze(model):
    named_parameter(model, UNDECLARED).requires_grad_(False)


def _add_module(model):
    model.transformer.h[0].adapter = torch.nn.Linear(2, 2)


def _untie(model):
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())


@pytest.mark.parametrize(("mutate", "name", "what"), [
    (_replace, UNDECLARED, "replaced by another tensor object"),
    (_new_storage, UNDECLARED, "its storage was replaced"),
    (_retype, UNDECLARED, "dtype torch.float32 -> torch.float64"),
    (_grad, UNDECLARED, "a gradient was left on it"),
    (_freeze, UNDECLARED, "requires_grad True -> False"),
    (_add_module, "transformer.h.0.adapter.weight", "added to the model"),
    (_untie, "lm_head.weight", "replaced by another tensor object"),  # same values, but no longer tied
])
@pytest.mark.parametrize("mode", FINGERPRINT_MODES)
def test_changes_other_than_values_are_named(model, mode, mutate, name, what) -> None:
    reference = ModelFingerprint.of(model, mode)
    with torch.no_grad():
        mutate(model)
    assert _changed(reference, model)[name] == what


def test_an_editor_that_only_leaves_flags_or_gradients_behind_is_told_to_give_them_back(model) -> None:
    from editors.fingerprint import UndeclaredChangeError

    reference = ModelFingerprint.of(model)
    _freeze(model)
    _grad(model)
    with pytest.raises(UndeclaredChangeError, match="give back the flags the edit sets and drop the gradients"):
        reference.check(model, editor="mine")
    other = next(p for name, p in model.named_parameters() if name != UNDECLARED)
    with torch.no_grad():
        other.mul_(2.0)  # a value changed too: a real undeclared write, no such hint
    with pytest.raises(UndeclaredChangeError) as caught:
        reference.check(model, editor="mine")
    assert "give back" not in str(caught.value)


def test_buffers_are_checked(model) -> None:
    model.register_buffer("table", torch.arange(10, dtype=torch.int64))
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    model.register_buffer("flags", torch.zeros(5, dtype=torch.bool))
    reference = ModelFingerprint.of(model)
    model.scratch = torch.zeros(3)  # a non-persistent buffer re-placed with the same values: allowed
    assert reference.changes(model) == []
    with torch.no_grad():
        model.table[-1] = 9 - 2**63  # 9 with its top bit set: only one bit of one int64
        model.scratch[1] = -0.0
        model.flags[4] = True
    assert _changed(reference, model) == {"table": "values", "scratch": "values", "flags": "values"}
    with pytest.raises(UndeclaredChangeError, match=r"changed buffer table \(values\), buffer scratch"):
        reference.check(model, editor="sloppy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_single_bit_flip_is_seen(dtype) -> None:
    torch.manual_seed(1)
    t = torch.randn(37, 3).to(dtype)  # 111 elements: an odd count, so 16-bit dtypes fall back to int16 words
    before = _checksum(_words(t)).tolist()
    raw = t.view(-1).view(torch.uint8)
    for byte in range(raw.numel()):
        for bit in range(8):
            raw[byte] ^= 1 << bit
            assert _checksum(_words(t)).tolist() != before, (byte, bit)
            raw[byte] ^= 1 << bit
    assert _checksum(_words(t)).tolist() == before


def test_permutations_and_sign_flips_that_keep_plain_sums_are_seen() -> None:
    torch.manual_seed(2)
    w = torch.randn(64, 64)
    base = _checksum(_words(w)).tolist()
    signs = torch.ones(64 * 64)
    signs[torch.randperm(64 * 64)[:2048]] = -1
    for changed in (w.t().contiguous(), w.flip(0), w.roll(1, 1), w * signs.view(64, 64),
                    -w, torch.where(w == w.max(), w.min(), torch.where(w == w.min(), w.max(), w))):
        assert _checksum(_words(changed)).tolist() != base
    nan = torch.tensor([float("nan"), 0.0])
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] ^= 1  # another nan payload
    assert _checksum(_words(nan)).tolist() != _checksum(_words(other_nan)).tolist()
    assert _checksum(_words(torch.tensor([0.0]))).tolist() != _checksum(_words(torch.tensor([-0.0]))).tolist()


def test_the_cpu_kernels_and_the_elementwise_path_agree() -> None:
    """GPUs take the elementwise path (no int64 dot/mv there); both are the same sums mod 2^64."""
    torch.manual_seed(3)
    for n in (1, 1023, 1024, 5000, 70_001):
        words = _words(torch.randn(n))
        expected = _checksum(words).tolist()
        for chunk in (1024, 4096, 1 << 18):
            assert _checksum(words, chunk=chunk, blas=False).tolist() == expected
            assert _checksum(words, chunk=chunk, blas=True).tolist() == expected
    assert _checksum(_words(torch.empty(0))).tolist() == [0, 0, 0]


def test_sampled_positions_are_distinct_and_spread() -> None:
    assert _sample_positions(100) is None
    rows, cols = 768, 2304
    positions = _sample_positions(rows * cols)
    assert positions.unique().numel() == positions.numel() == 4097
    assert positions[-1] == rows * cols - 1
    assert (positions // cols).unique().numel() > 700  # nearly every row band
    assert (positions % cols).unique().numel() > 1500  # and most columns, not a few


def test_sampled_mode_sees_dense_writes_but_not_a_single_entry_of_a_large_tensor() -> None:
    """The documented trade-off of mode "sampled": a rank-one update shows, one embedding row need not."""
    torch.manual_seed(4)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=4000, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    sampled, full = ModelFingerprint.of(model, "sampled"), ModelFingerprint.of(model, "full")
    wte = named_parameter(model, "transformer.wte.weight")
    saved = wte.detach().clone()
    positions = set(_sample_positions(wte.numel()).tolist())
    row = next(r for r in range(4000) if not positions & set(range(r * 16, r * 16 + 16)))
    with torch.no_grad():
        wte[row] += 1.0
    assert sampled.changes(model) == []
    assert _changed(full, model) == {"transformer.wte.weight": "values", "lm_head.weight": "values"}
    with torch.no_grad():
        wte.copy_(saved)
        assert sampled.changes(model) == []
        wte += 1e-3 * torch.outer(torch.randn(4000), torch.randn(16))  # a rank-one update
    assert "transformer.wte.weight" in _changed(sampled, model)


# ---------------------------------------------------------------------------------------------- buffers


def test_gptj_sin_cos_table_may_be_moved_but_not_changed() -> None:
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=50, rotary_dim=4, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    attn = model.transformer.h[0].attn
    reference = ModelFingerprint.of(model)
    assert "transformer.h.0.attn.embed_positions" in reference.names
    with torch.no_grad():
        model(torch.arange(10)[None])
    # what _get_embed_positions does when the position ids live elsewhere: a copy, reassigned
    attn.embed_positions = attn.embed_positions.clone()
    assert reference.changes(model) == []
    with torch.no_grad():
        attn.embed_positions[0, 0] += 1.0
    assert _changed(reference, model) == {"transformer.h.0.attn.embed_positions": "values"}


def _llama(**rope) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=0, **rope)
    return LlamaForCausalLM(config).eval()


def test_llama_rotary_frequencies_are_checked_unless_dynamic() -> None:
    model = _llama()
    reference = ModelFingerprint.of(model)
    assert {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= set(reference.names)
    with torch.no_grad():
        model(torch.arange(20)[None])
        assert reference.changes(model) == []  # default RoPE: nothing recomputed, however long the input
        model.model.rotary_emb.inv_freq.mul_(2)
    assert _changed(reference, model) == {"model.rotary_emb.inv_freq": "values"}

    dynamic = _llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    reference = ModelFingerprint.of(dynamic)
    assert "model.rotary_emb.inv_freq" not in reference.names  # recomputed per sequence length by the model
    before = dynamic.model.rotary_emb.inv_freq.clone()
    with torch.no_grad():
        dynamic(torch.arange(20)[None])  # longer than max_position_embeddings: new frequencies
    assert not torch.equal(dynamic.model.rotary_emb.inv_freq, before)
    assert reference.changes(dynamic) == []
    with torch.no_grad():
        dynamic(torch.arange(4)[None])  # short again: original_inv_freq re-registered (a copy)
        assert reference.changes(dynamic) == []
        dynamic.model.rotary_emb.original_inv_freq.add_(1)
    assert _changed(reference, dynamic) == {"model.rotary_emb.original_inv_freq": "values"}


# ---------------------------------------------------------------------------------------------- the hub

EDITORS = '''
import torch
from editors.base import EditOutcome, EditorBase

DECLARED = "transformer.h.1.mlp.c_proj.weight"
UNDECLARED = "transformer.h.0.attn.c_attn.weight"


def _param(model, name):
    return model.get_parameter(name)


class Tidy(EditorBase):
    """Writes only what it declares: a fixed nudge of one MLP projection."""
    name = "rc-tidy"
    hparams = {"scale": 1.05}

    def parameters_touched(self, model, family):
        return (DECLARED,)

    def apply(self, model, tokenizer, family, requests):
        with torch.no_grad():
            _param(model, DECLARED).mul_(self.hparams["scale"])
        return EditOutcome(edited=(DECLARED,))


class Sloppy(Tidy):
    """Declares one projection, also scribbles on the attention weights it never names."""
    name = "rc-sloppy"

    def apply(self, model, tokenizer, family, requests):
        with torch.no_grad():
            _param(model, UNDECLARED).add_(0.25)
        return super().apply(model, tokenizer, family, requests)


class SloppySetUp(Tidy):
    """Writes the model while being set up, before any edit."""
    name = "rc-sloppy-setup"

    def setup(self, model, tokenizer, family, provided):
        super().setup(model, tokenizer, family, provided)
        with torch.no_grad():
            model.get_submodule("transformer.ln_f").bias.add_(1.0)


class SloppyDenominator(Tidy):
    """Reports a denominator, and writes the model while computing it."""
    name = "rc-sloppy-denominator"

    def denominator(self, model, tokenizer, family, request):
        with torch.no_grad():
            model.get_submodule("transformer.wpe").weight[0, 0] += 1.0
        return {"denominator": 1.0}


def make_sloppy_denominator(hparams):
    return SloppyDenominator()


def make_tidy(hparams):
    return Tidy()


def make_sloppy(hparams):
    return Sloppy()


def make_sloppy_setup(hparams):
    return SloppySetUp()
'''


@pytest.fixture(scope="module")
def rc_editors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_editor_package(tmp_path_factory.mktemp("rc-editors"), "editsafety_rc_editors", EDITORS,
                                {"rc-tidy": "make_tidy", "rc-sloppy": "make_sloppy",
                                 "rc-sloppy-setup": "make_sloppy_setup",
                                 "rc-sloppy-denominator": "make_sloppy_denominator"})


@pytest.fixture()
def editors_installed(rc_editors: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(rc_editors))
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    yield
    sys.modules.pop("editsafety_rc_editors", None)


def _hub(micro_model: Path, restore_check: str = "full", sequential: bool = False):
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    plan = build_plan(["rc-tidy", "rc-sloppy", "rc-sloppy-setup", "rc-sloppy-denominator"], [str(micro_model)],
                      ["normal"], limit=2, sequential=sequential)
    return plan, ModelHub(plan, HubOptions(restore_check=restore_check))


def _item(plan, editor: str, kind: str = "case", index: int = 0):
    return [i for i in plan.items if i.editor == editor and i.kind == kind][index]


def _numbers(outcome) -> dict:
    record = dict(outcome.record)
    record.pop("duration_s")
    return record


def test_a_sloppy_edit_fails_its_test_and_the_next_test_sees_a_fresh_model(micro_model, editors_installed) -> None:
    plan, hub = _hub(micro_model)
    tidy = hub.run(_item(plan, "rc-tidy"))
    assert tidy.error is None  # a well-behaved editor passes the check
    loaded = hub.loaded(plan.models[0].slug)

    sloppy = hub.run(_item(plan, "rc-sloppy"))
    assert isinstance(sloppy.error, UndeclaredChangeError)
    message = str(sloppy.error)
    assert message.startswith(f"editor 'rc-sloppy' changed {UNDECLARED} (values)")
    assert f"which it does not declare in parameters_touched (it declares {DECLARED})" in message
    assert sloppy.record["outcome"] == "error" and UNDECLARED in sloppy.record["violations"][0]

    after = hub.run(_item(plan, "rc-tidy", index=1))
    assert hub.loaded(plan.models[0].slug) is not loaded  # reloaded after the sloppy test
    _, fresh_hub = _hub(micro_model)
    fresh = fresh_hub.run(_item(plan, "rc-tidy", index=1))
    assert after.error is None and fresh.error is None
    assert _numbers(after) == _numbers(fresh)
    assert not math.isnan(after.record["metrics"]["ppl_edited"])


def test_without_the_check_the_sloppy_edit_leaks_into_the_next_test(micro_model, editors_installed) -> None:
    """The control: what the check prevents."""
    plan, hub = _hub(micro_model, restore_check="off")
    assert hub.run(_item(plan, "rc-sloppy")).error is None
    leaked = hub.run(_item(plan, "rc-tidy", index=1))
    _, fresh_hub = _hub(micro_model, restore_check="off")
    fresh = fresh_hub.run(_item(plan, "rc-tidy", index=1))
    assert leaked.record["metrics"]["ppl_edited"] != fresh.record["metrics"]["ppl_edited"]


def test_a_sloppy_sequential_run_fails_and_the_next_run_sees_a_fresh_model(micro_model, editors_installed) -> None:
    plan, hub = _hub(micro_model, sequential=True)
    sloppy = hub.run(_item(plan, "rc-sloppy", "sequential"))
    assert isinstance(sloppy.error, UndeclaredChangeError) and sloppy.error.tensors == (UNDECLARED,)
    assert len(sloppy.record["ppl_after_each"]) == 2  # the run itself completed; the check after it failed
    after = hub.run(_item(plan, "rc-tidy", "sequential"))
    _, fresh_hub = _hub(micro_model, sequential=True)
    fresh = fresh_hub.run(_item(plan, "rc-tidy", "sequential"))
    assert after.error is None
    assert _numbers(after) == _numbers(fresh)


def test_a_set_up_that_writes_the_model_fails_every_test_of_its_editor_only(micro_model, editors_installed) -> None:
    plan, hub = _hub(micro_model, restore_check="sampled")
    first = hub.run(_item(plan, "rc-sloppy-setup"))
    assert isinstance(first.error, UndeclaredChangeError)
    # a small tensor is compared whole even in mode "sampled"
    assert str(first.error).startswith("editor 'rc-sloppy-setup' changed transformer.ln_f.bias (values) during its "
                                       "set-up")
    again = hub.run(_item(plan, "rc-sloppy-setup", index=1))
    assert again.error is first.error  # not set up again: the same error
    after = hub.run(_item(plan, "rc-tidy"))
    _, fresh_hub = _hub(micro_model, restore_check="sampled")
    assert _numbers(after) == _numbers(fresh_hub.run(_item(plan, "rc-tidy")))


def test_denominator_reports_that_write_the_model_fail_their_editor(micro_model, editors_installed) -> None:
    plan, hub = _hub(micro_model)
    first = hub.run(_item(plan, "rc-sloppy-denominator"))
    assert isinstance(first.error, UndeclaredChangeError)
    assert str(first.error).startswith("editor 'rc-sloppy-denominator' changed transformer.wpe.weight (values) "
                                       "during its denominator reports")
    assert hub.run(_item(plan, "rc-sloppy-denominator", index=1)).error is first.error
    after = hub.run(_item(plan, "rc-tidy"))
    _, fresh_hub = _hub(micro_model)
    assert _numbers(after) == _numbers(fresh_hub.run(_item(plan, "rc-tidy")))


def test_the_option_is_validated() -> None:
    import argparse

    from pytest_editsafety.hub import RESTORE_CHECKS, HubOptions
    from pytest_editsafety.options import _restore_check

    assert RESTORE_CHECKS == ("full", "sampled", "off") and HubOptions().restore_check == "full"
    with pytest.raises(ValueError, match="restore_check: 'some' is not one of full, sampled, off"):
        HubOptions(restore_check="some")
    assert _restore_check(" sampled ") == "sampled"
    with pytest.raises(argparse.ArgumentTypeError, match="use one of full, sampled, off"):
        _restore_check("everything")


def test_a_bad_option_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--editsafety-restore-check=most")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--editsafety-restore-check: unsupported value 'most'" in result.stderr.str()
