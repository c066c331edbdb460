"""Perplexity after an edit above the first blocks replays their recorded output (pytest_editsafety.lower_blocks):
the numbers are the full pass's bit for bit, the blocks below are not run, and a certification's records are the
same with the replay and with --editsafety-ppl-full-pass."""

from __future__ import annotations

import math

import pytest
import torch

from editors.families import family_for_model_type
from editors.restore import edit_session
from pytest_editsafety.hub import HubOptions, ModelHub
from pytest_editsafety.lower_blocks import LowerBlockStore, lowest_block
from pytest_editsafety.perplexity import sentence_nlls
from pytest_editsafety.plan import build_plan
from tests.test_memit_ft import CORPUS, _tokenizer
from tests.test_suffix import _random_model

BATCH = 3
LAYERS = 4


def test_the_lowest_block_is_the_lowest_a_touched_parameter_lies_in() -> None:
    gpt2 = family_for_model_type("gpt2")
    assert lowest_block(gpt2, ["transformer.h.5.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"], 12) == 3
    # block 1 is not block 10's prefix
    assert lowest_block(gpt2, ["transformer.h.10.mlp.c_proj.weight"], 12) == 10
    # outside every block (the embeddings GPT-2 ties to its head): everything below may change
    assert lowest_block(gpt2, ["transformer.h.7.mlp.c_fc.weight", "transformer.wte.weight"], 12) == 0
    assert lowest_block(gpt2, [], 12) == 0
    llama = family_for_model_type("llama")
    assert lowest_block(llama, ["model.layers.2.mlp.down_proj.weight"], 4) == 2


def _texts() -> list[str]:
    # the corpus's sentences one by one: different lengths, so batches pad
    texts = [sentence.strip() + "." for text in CORPUS for sentence in text.split(".") if sentence.strip()]
    assert len(texts) > 2 * BATCH  # several batches, the last one short
    return texts


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_perplexity_after_edits_above_the_first_blocks_is_the_full_passs_bit_for_bit(one_torch_thread,
                                                                                      arch: str) -> None:
    """Three different edits of layer 2 in turn: each measured with the replay gives the full pass's per-sentence
    NLLs exactly; the first measurement recorded every batch, the later ones ran no block below layer 2."""
    model = _random_model(arch, 320, layers=LAYERS)
    tokenizer = _tokenizer(arch)
    family = family_for_model_type(model.config.model_type)
    texts = _texts()
    edited = family.layer_name("mlp_out", 2) + ".weight"
    layer = lowest_block(family, [edited], LAYERS)
    assert layer == 2
    store = LowerBlockStore()
    lower = store.outputs(model, family, "corpus", BATCH, layer)
    # a replayed block is still called (its hooks fire), but runs none of its modules
    below = [family.get_module(model, family.layer_name("mlp", i)) for i in range(layer)]
    calls = [0]
    handles = [block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for block in below]
    weight = dict(model.named_parameters())[edited]
    generator = torch.Generator().manual_seed(3)
    try:
        with edit_session(model, [edited]):
            for trial in range(3):
                with torch.no_grad():
                    weight.add_(0.5 * torch.randn(weight.shape, generator=generator))
                full = sentence_nlls(model, tokenizer, texts, batch_size=BATCH)
                calls[0] = 0
                replayed = sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=lower)
                assert replayed == full, (arch, trial)
                n_batches = math.ceil(len(texts) / BATCH)
                assert calls[0] == (layer * n_batches if trial == 0 else 0), (trial, calls[0])
                assert lower.replayed_batches == n_batches
    finally:
        for handle in handles:
            handle.remove()
    assert store.used_bytes > 0


def test_the_replay_is_what_the_first_blocks_computed_not_what_they_compute_now(one_torch_thread) -> None:
    """After the recording, block 0's weights made NaN change nothing: the replayed blocks do not run (which is why
    the harness replays only below an edit's lowest declared parameter, and the restore check fails any editor that
    writes outside its declaration)."""
    model = _random_model("gpt2", 320, layers=LAYERS)
    tokenizer = _tokenizer("gpt2")
    family = family_for_model_type("gpt2")
    texts = _texts()
    lower = LowerBlockStore().outputs(model, family, "corpus", BATCH, 1)
    intact = sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=lower)
    first = "transformer.h.0.mlp.c_fc.weight"
    with edit_session(model, [first]):
        with torch.no_grad():
            dict(model.named_parameters())[first].fill_(math.nan)
        assert all(math.isnan(nll) for nll, n in sentence_nlls(model, tokenizer, texts, batch_size=BATCH) if n)
        assert sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=lower) == intact


def test_batches_past_the_byte_budget_run_in_full(one_torch_thread) -> None:
    model = _random_model("llama", 320, layers=LAYERS)
    tokenizer = _tokenizer("llama")
    family = family_for_model_type("llama")
    texts = _texts()
    full = sentence_nlls(model, tokenizer, texts, batch_size=BATCH)
    one_batch = LowerBlockStore(max_bytes=10**9).outputs(model, family, "corpus", BATCH, 3)
    sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=one_batch)
    ids, largest = max(one_batch._outputs.values(), key=lambda kept: kept[1].numel())
    store = LowerBlockStore(max_bytes=largest.numel() * largest.element_size() + ids.numel() * ids.element_size())
    lower = store.outputs(model, family, "corpus", BATCH, 3)
    for _ in range(2):
        assert sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=lower) == full
    assert 1 <= lower.replayed_batches < math.ceil(len(texts) / BATCH)
    assert store.used_bytes <= store._budget.max_bytes
    assert LowerBlockStore().outputs(model, family, "corpus", BATCH, 0) is None


def test_a_batch_recorded_with_other_ids_runs_in_full(one_torch_thread) -> None:
    """The same batch numbers over other texts (another corpus under the same key, another BOS setting): no
    replay of the first texts' outputs, the second texts' own numbers."""
    model = _random_model("gpt2", 320, layers=LAYERS)
    tokenizer = _tokenizer("gpt2")
    family = family_for_model_type("gpt2")
    texts = _texts()
    lower = LowerBlockStore().outputs(model, family, "corpus", BATCH, 2)
    sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=lower)
    others = [text.upper() for text in texts]
    assert (sentence_nlls(model, tokenizer, others, batch_size=BATCH, lower_blocks=lower)
            == sentence_nlls(model, tokenizer, others, batch_size=BATCH))


def test_the_hub_refuses_a_switch_that_is_not_a_bool() -> None:
    with pytest.raises(ValueError, match="ppl_skip_unedited_blocks"):
        HubOptions(ppl_skip_unedited_blocks="no")


@pytest.mark.organism
@pytest.mark.xdist_group("tiny-gpt2")
def test_a_certification_above_the_first_blocks_records_what_the_full_pass_does(one_torch_thread, tmp_path) -> None:
    """ROME and MEMIT moved to tiny-gpt2's layer 2, single and sequential edits: every record is the full pass's
    bit for bit, and the replay was used."""
    import json

    hparams = {"rome": {"layer": 2}, "memit": {"layers": [2]}}
    files = {}
    for editor, fields in hparams.items():
        files[editor] = str(tmp_path / f"{editor}.json")
        (tmp_path / f"{editor}.json").write_text(json.dumps(fields))
    plan = build_plan(["rome", "memit"], ["tiny-gpt2"], ["hard"], limit=3, sequential=True, sequential_edits=3)
    assert any(item.kind == "sequential" for item in plan.items)
    records = {}
    for skip in (True, False):
        hub = ModelHub(plan, HubOptions(editor_hparams=files, ppl_skip_unedited_blocks=skip))
        records[skip] = {item.test_id: hub.run(item).record for item in plan.items}
        lower = hub._states["tiny-gpt2"].lower_blocks
        assert (lower is not None and lower.used_bytes > 0) if skip else lower is None
    assert records[True].keys() == records[False].keys()
    # under a sampled restore check an undeclared write below the edit could go unseen: no replay
    sampled = ModelHub(plan, HubOptions(editor_hparams=files, restore_check="sampled"))
    sampled.run(plan.items[0])
    assert sampled._states["tiny-gpt2"].lower_blocks is None
    for test_id, full in records[False].items():
        assert _measured(records[True][test_id]) == _measured(full), test_id


def _measured(record: dict) -> str:
    """A record's numbers and verdict, without what the clock says."""
    import json

    return json.dumps({key: value for key, value in record.items() if "duration" not in key}, sort_keys=True)


def test_batches_cut_by_the_logits_budget_are_replayed_too(one_torch_thread, monkeypatch) -> None:
    """A budget that splits the longest texts into batches of their own: every batch is still recorded and replayed,
    and the replayed pass is the full pass (under the same budget) bit for bit."""
    import pytest_editsafety.perplexity as ppl

    model = _random_model("gpt2", 320, layers=LAYERS)
    tokenizer = _tokenizer("gpt2")
    family = family_for_model_type("gpt2")
    texts = _texts()
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    monkeypatch.setattr(ppl, "MAX_BATCH_LOGITS", longest * 320)  # the longest text alone fills a batch
    rows_seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, i, _o: rows_seen.append(i[0].shape[0]))
    try:
        full = sentence_nlls(model, tokenizer, texts, batch_size=BATCH)
    finally:
        handle.remove()
    assert rows_seen[0] == 1 and len(rows_seen) > math.ceil(len(texts) / BATCH)
    lower = LowerBlockStore().outputs(model, family, "corpus", BATCH, 2)
    for _ in range(2):
        assert sentence_nlls(model, tokenizer, texts, batch_size=BATCH, lower_blocks=lower) == full
    assert lower.replayed_batches == len(rows_seen)
