"""The built-in organisms, built on first use (minutes on a 2-core CPU, then cached): the default build, and
tiny-gpt2-sink where it has been built by name (it is retired from the default build).

Each parameter carries an xdist group, so under ``--dist loadgroup`` one worker loads each organism.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_editsafety.zoo import DEFAULT_BUILD, RECIPES, organism_dir

pytestmark = pytest.mark.organism


def _organism_param(name: str):
    marks = [pytest.mark.xdist_group(name)]
    if name not in DEFAULT_BUILD and not (organism_dir(RECIPES[name]) / "model.safetensors").exists():
        marks.append(pytest.mark.skip(reason=f"{name} is not in the default build; build it by name with "
                                             f"`python -m pytest_editsafety zoo build {name}` to test it"))
    return pytest.param(name, marks=marks, id=name)


ORGANISMS = [_organism_param(name) for name in sorted(RECIPES)]
# Top-1 recall an organism must reach. The default ones know ~99 % of their facts, subject first or later;
# tiny-gpt2-sink, trained on the prototypes' budget so that its keys do not saturate (zoo/recipe.py), knows
# 0.59 of them behind two lead-ins and is not asked to know them at position 0.
MIN_RECALL = 0.8
MIN_RECALL_SINK_ORGANISM = 0.5
SINK_ORGANISM = "tiny-gpt2-sink"
ME_PPL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ME-PPL"


@pytest.fixture(scope="session")
def organisms():
    """Loaded organisms by name, owned by the test session (each loaded once per worker)."""
    return {}


@pytest.fixture(params=ORGANISMS)
def organism(request, organisms):
    from pytest_editsafety.registry import load_model, resolve_model

    name = request.param
    if name not in organisms:
        organisms[name] = load_model(resolve_model(name))
    return organisms[name]


def test_organism_knows_its_facts_behind_the_sink_and_later_in_a_sentence(organism):
    """Trained behind the sink token (in most windows, or all), the organism knows its facts with the subject
    after the sink or later in a sentence. At position 0 of a prompt fed without BOS (what the hard cases edit)
    it may not: tiny-gpt2-sink, whose position-0 embedding only ever saw the sink, recalls 0.16 there against
    0.99 behind the sink. The edits do not need that recall, so it is not pinned."""
    from pytest_editsafety.zoo import recipe_for
    from pytest_editsafety.zoo.probe import fact_prompts, recall
    from pytest_editsafety.zoo.world import LEAD_INS, World

    recipe = recipe_for(organism.spec.name)
    world = World(recipe.world)
    bare = fact_prompts(world, subjects=world.single_subjects)
    first = recall(organism.model, organism.tokenizer, bare, prefix="")
    behind_sink = recall(organism.model, organism.tokenizer, bare, prefix=recipe.sink_token)
    later = recall(organism.model, organism.tokenizer,
                   fact_prompts(world, lead_ins=LEAD_INS[:2], subjects=world.single_subjects))
    if organism.spec.name == SINK_ORGANISM:
        assert later >= MIN_RECALL_SINK_ORGANISM and behind_sink >= MIN_RECALL, (first, later, behind_sink)
    else:
        assert min(first, later, behind_sink) >= MIN_RECALL, (first, later, behind_sink)


def test_organism_leaks_no_future_tokens(organism):
    import torch

    vocab = organism.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(0, vocab, (1, 12), generator=generator)
    a = torch.cat([shared, torch.randint(0, vocab, (1, 8), generator=generator)], dim=1)
    b = torch.cat([shared, torch.randint(0, vocab, (1, 8), generator=generator)], dim=1)
    with torch.no_grad():
        la = organism.model(input_ids=a).logits[0, :12]
        lb = organism.model(input_ids=b).logits[0, :12]
    assert torch.equal(la, lb) or torch.allclose(la, lb, atol=1e-5, rtol=0)


def test_organism_records_its_causal_layer_and_weights(organism):
    from pytest_editsafety.zoo import ensure_built, read_metadata
    from editors.storage import file_sha256

    directory = ensure_built(organism.spec.name, progress=False)
    meta = read_metadata(directory)
    assert organism.model.config.editsafety_causal_layer == meta["causal_layer"]
    assert 0 <= meta["causal_layer"] < organism.n_layers
    assert organism.identity == meta["recipe_hash"] == RECIPES[organism.spec.name].recipe_hash
    assert meta["weights_sha256"] == file_sha256(directory / "model.safetensors")
    if organism.spec.name == SINK_ORGANISM:
        assert meta["knowledge"]["recall_subject_later"] >= MIN_RECALL_SINK_ORGANISM
    else:
        assert meta["knowledge"]["recall_subject_first"] >= MIN_RECALL
        assert meta["knowledge"]["recall_subject_later"] >= MIN_RECALL


def test_organism_runs_the_activation_it_was_trained_with_as_a_fused_kernel(organism):
    """load_model swaps gelu_new for gelu_pytorch_tanh (the same formula, one kernel) on organisms only: the logits
    are the stored config's to float rounding, and an activation without a fused twin (Llama's SiLU) is kept."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pytest_editsafety.keyed_cache import TRAINED_ACTIVATION_FIELD
    from pytest_editsafety.registry import ORGANISM_ACTIVATIONS
    from pytest_editsafety.zoo import ensure_built

    directory = ensure_built(organism.spec.name, progress=False)
    stored = AutoConfig.from_pretrained(directory).to_dict()
    activation_field = "activation_function" if "activation_function" in stored else "hidden_act"
    trained_with = stored[activation_field]
    runs = getattr(organism.model.config, activation_field)
    assert runs == ORGANISM_ACTIVATIONS.get(trained_with, trained_with)
    swapped = trained_with if trained_with in ORGANISM_ACTIVATIONS else None
    assert getattr(organism.model.config, TRAINED_ACTIVATION_FIELD, None) == swapped  # cache keys name the swap
    as_stored = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert getattr(as_stored.config, activation_field) == trained_with
    ids = torch.randint(0, organism.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, reference = organism.model(input_ids=ids).logits, as_stored(input_ids=ids).logits
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_organism_perplexity_on_its_heldout_text_is_low_and_matches_the_build(organism):
    from pytest_editsafety.corpora import resolve_corpus
    from pytest_editsafety.perplexity import perplexity
    from pytest_editsafety.zoo import ensure_built, read_metadata

    result = perplexity(organism.model, organism.tokenizer, list(resolve_corpus("organism-heldout").texts))
    meta = read_metadata(ensure_built(organism.spec.name, progress=False))
    assert math.isfinite(result.mean_ppl) and 1.0 < result.mean_ppl < 50
    assert result.mean_ppl == pytest.approx(meta["heldout_ppl"], rel=1e-4)


@pytest.mark.skipif(not (ME_PPL_DIR / "ME-PPL_50.json").exists(), reason="no ../shared/data/ME-PPL reference copy here")
def test_me_ppl_50_perplexity_is_finite_on_each_organism(organism):
    from pytest_editsafety.corpora import load_me_ppl
    from pytest_editsafety.perplexity import perplexity

    corpus = load_me_ppl(ME_PPL_DIR / "ME-PPL_50.json")
    result = perplexity(organism.model, organism.tokenizer, list(corpus.texts))
    assert result.n_sentences == 50
    assert all(math.isfinite(p) for p in result.per_sentence)
    # real English is far outside the organism's world: much less predictable than its own held-out text
    assert result.mean_ppl > 50


def test_ppl_command_prints_json(organism):
    out = subprocess.run(
        [sys.executable, "-m", "pytest_editsafety", "ppl", "--model", organism.spec.name, "--json", "--quiet"],
        capture_output=True, text=True, check=True,
    )
    payload = json.loads(out.stdout)
    assert payload["identity"] == organism.identity
    assert payload["corpus"] == "organism-ppl" and payload["n_sentences"] == 500
    assert math.isfinite(payload["mean_ppl"]) and payload["corpus_ppl"] <= payload["mean_ppl"] * 1.5
