"""The organism's build path: world, tokenizer, training stream, deterministic builds, the build lock."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from editors.storage import build_lock, build_once
from pytest_editsafety.zoo.build import METADATA_FILE, UnknownOrganismError, build_recipe, file_sha256, recipe_for
from pytest_editsafety.zoo.recipe import RECIPES
from pytest_editsafety.zoo.world import LEAD_INS, HELDOUT_LEAD_INS, World, WorldSpec
from tests.zoo_helpers import micro_recipe


def test_world_is_a_pure_function_of_its_spec():
    a, b = World(WorldSpec(seed=3)), World(WorldSpec(seed=3))
    assert a.facts == b.facts and a.filler_sentences() == b.filler_sentences()
    assert World(WorldSpec(seed=4)).facts != a.facts


def test_world_has_many_attributes_per_subject_and_disjoint_heldout_text():
    world = World(WorldSpec())
    relations = {f.relation for f in world.facts}
    assert len(relations) >= 10
    assert len(world.facts) == len(world.subjects) * len(relations)
    train, heldout = world.filler_sentences()
    assert not set(train) & set(heldout)
    # two-token subjects share first and last names, so neither token alone identifies the subject
    firsts = [s.split()[0] for s in world.double_subjects]
    assert len(set(firsts)) < len(firsts)
    assert not set(LEAD_INS) & set(HELDOUT_LEAD_INS)


def test_recipe_hash_covers_every_field():
    base = RECIPES["tiny-gpt2"]
    changed = [
        dataclasses.replace(base, vocab_size=base.vocab_size + 1),
        dataclasses.replace(base, train=dataclasses.replace(base.train, seed=1)),
        dataclasses.replace(base, shape=dataclasses.replace(base.shape, n_layer=base.shape.n_layer + 1)),
        dataclasses.replace(base, world=dataclasses.replace(base.world, seed=9)),
    ]
    hashes = {base.recipe_hash} | {r.recipe_hash for r in changed}
    assert len(hashes) == 5
    assert base.recipe_hash == RECIPES["tiny-gpt2"].recipe_hash


def test_unknown_organism_names_the_known_ones():
    with pytest.raises(UnknownOrganismError, match="tiny-gpt2"):
        recipe_for("tiny-gpt5")


@pytest.fixture(scope="module")
def micro_tokenizer_and_world():
    from pytest_editsafety.zoo.data import tokenizer_training_texts
    from pytest_editsafety.zoo.tokenizer import train_tokenizer

    recipe = micro_recipe()
    world = World(recipe.world)
    return recipe, world, train_tokenizer(recipe, tokenizer_training_texts(world))


def test_single_subjects_are_single_tokens_at_document_start_and_mid_text(micro_tokenizer_and_world):
    from pytest_editsafety.zoo.tokenizer import check_single_token_subjects

    recipe, world, tokenizer = micro_tokenizer_and_world
    check_single_token_subjects(tokenizer, world.single_subjects, recipe.name)
    assert all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) == 1 for s in world.single_subjects)


def test_a_vocabulary_too_small_for_one_token_subjects_is_refused_naming_the_recipe():
    from pytest_editsafety.zoo.data import tokenizer_training_texts
    from pytest_editsafety.zoo.tokenizer import check_single_token_subjects, train_tokenizer

    recipe = dataclasses.replace(micro_recipe(), vocab_size=300)
    world = World(recipe.world)
    tokenizer = train_tokenizer(recipe, tokenizer_training_texts(world))
    with pytest.raises(ValueError, match=f"{recipe.name}.*raise vocab_size"):
        check_single_token_subjects(tokenizer, world.single_subjects, recipe.name)


def test_training_windows_are_deterministic_and_sunk(micro_tokenizer_and_world):
    from pytest_editsafety.zoo.data import WindowStream, build_pools

    recipe, world, tokenizer = micro_tokenizer_and_world
    pools = build_pools(world, tokenizer)
    sink = tokenizer.convert_tokens_to_ids(recipe.sink_token)
    first = WindowStream(recipe, pools, sink).batch()
    second = WindowStream(recipe, pools, sink).batch()
    assert (first == second).all()
    assert first.shape == (recipe.train.batch_size, recipe.shape.block_size)
    # the sink never occurs past position 0, so a content token at position 0 is rare (1 - sink_share)
    assert not (first[:, 1:] == sink).any()
    stream = WindowStream(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, sink_share=0.5)), pools, sink)
    starts = [stream.window()[0] == sink for _ in range(400)]
    assert 0.4 < sum(starts) / len(starts) < 0.6


def test_unaligned_windows_start_inside_sentences(micro_tokenizer_and_world):
    from pytest_editsafety.zoo.data import WindowStream, build_pools

    recipe, world, tokenizer = micro_tokenizer_and_world
    pools = build_pools(world, tokenizer)
    sink = tokenizer.convert_tokens_to_ids(recipe.sink_token)

    starts = {tuple(sentence[:3]) for sentence in pools.fact_start}

    def sentence_start_share(aligned_share: float) -> float:
        train = dataclasses.replace(recipe.train, sink_share=0.0, aligned_share=aligned_share)
        stream = WindowStream(dataclasses.replace(recipe, train=train), pools, sink)
        windows = [stream.window() for _ in range(300)]
        return sum(tuple(w[:3]) in starts for w in windows) / len(windows)

    aligned, unaligned = sentence_start_share(1.0), sentence_start_share(0.0)
    assert aligned > 0.2  # fact sentences open most aligned windows
    assert unaligned < aligned / 4


def test_training_options_at_their_neutral_value_keep_the_recipe_hash():
    recipe = micro_recipe()
    for option, value in (("aligned_share", 0.5), ("subject_embedding_norm", 2.0)):
        assert option not in recipe.to_dict()["train"]
        shifted = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **{option: value}))
        assert shifted.to_dict()["train"][option] == value
        assert shifted.recipe_hash != recipe.recipe_hash


def test_fixed_subject_embeddings_keep_their_rescaled_init_while_other_tokens_train(micro_tokenizer_and_world):
    import torch

    from pytest_editsafety.zoo.architectures import build_untrained
    from pytest_editsafety.zoo.data import WindowStream, build_pools
    from pytest_editsafety.zoo.tokenizer import subject_token_ids
    from pytest_editsafety.zoo.train import train

    _, world, tokenizer = micro_tokenizer_and_world
    recipe = micro_recipe(subject_embedding_norm=1.5)
    model = build_untrained(recipe, tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    subjects = subject_token_ids(tokenizer, world.single_subjects)
    assert len(subjects) == 2 * len(world.single_subjects)  # "Name" and " Name" are distinct tokens
    stream = WindowStream(recipe, build_pools(world, tokenizer), tokenizer.convert_tokens_to_ids(recipe.sink_token))
    train(model, recipe, stream, progress=False, frozen_token_ids=subjects)

    after = model.get_input_embeddings().weight.detach()
    rows = torch.tensor(subjects)
    expected = before[rows] * (1.5 / before[rows].norm(dim=1, keepdim=True))
    assert torch.equal(after[rows], expected)
    # every other token the training text uses moved (a trained row, not just one stray change)
    seen = {token for sentence in build_pools(world, tokenizer).fact_mid[:50] for token in sentence} - set(subjects)
    assert seen and all(not torch.equal(after[t], before[t]) for t in seen)
    assert not model.get_input_embeddings().weight._backward_hooks  # the freezing hook is gone after training


def test_fixed_subject_ids_need_a_norm(micro_tokenizer_and_world):
    from pytest_editsafety.zoo.architectures import build_untrained
    from pytest_editsafety.zoo.data import WindowStream, build_pools
    from pytest_editsafety.zoo.tokenizer import subject_token_ids
    from pytest_editsafety.zoo.train import train

    _, world, tokenizer = micro_tokenizer_and_world
    recipe = micro_recipe()  # subject_embedding_norm None
    model = build_untrained(recipe, tokenizer)
    stream = WindowStream(recipe, build_pools(world, tokenizer), tokenizer.convert_tokens_to_ids(recipe.sink_token))
    with pytest.raises(ValueError, match="subject_embedding_norm"):
        train(model, recipe, stream, progress=False,
              frozen_token_ids=subject_token_ids(tokenizer, world.single_subjects))


def test_llama_organism_tokenizer_prepends_bos_like_llama(micro_tokenizer_and_world):
    from pytest_editsafety.zoo.data import tokenizer_training_texts
    from pytest_editsafety.zoo.tokenizer import train_tokenizer

    _, world, gpt_tokenizer = micro_tokenizer_and_world
    llama_tokenizer = train_tokenizer(micro_recipe("llama"), tokenizer_training_texts(world))
    assert llama_tokenizer("The dog")["input_ids"][0] == llama_tokenizer.bos_token_id
    assert gpt_tokenizer("The dog")["input_ids"][0] != gpt_tokenizer.bos_token_id


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
def test_micro_build_is_bit_identical_across_builds(tmp_path, family):
    recipe = micro_recipe(family)
    first = build_recipe(recipe, progress=False, root=tmp_path / "a")
    second = build_recipe(recipe, progress=False, root=tmp_path / "b")
    assert file_sha256(first / "model.safetensors") == file_sha256(second / "model.safetensors")
    meta = json.loads((first / METADATA_FILE).read_text())
    assert meta["recipe_hash"] == recipe.recipe_hash
    assert meta["weights_sha256"] == file_sha256(first / "model.safetensors")
    config = json.loads((first / "config.json").read_text())
    assert config["editsafety_causal_layer"] == meta["causal_layer"]
    assert 0 <= meta["causal_layer"] < recipe.shape.n_layer
    if family == "gptj":  # sdpa set on GPT-J after construction drops the causal mask in transformers 5.x
        from pytest_editsafety.registry import load_model, resolve_model

        assert load_model(resolve_model(str(first))).model.config._attn_implementation == "eager"


def test_different_seed_gives_different_weights(tmp_path):
    a = build_recipe(micro_recipe(), progress=False, root=tmp_path)
    b = build_recipe(micro_recipe(seed=1), progress=False, root=tmp_path)
    assert a != b
    assert file_sha256(a / "model.safetensors") != file_sha256(b / "model.safetensors")


def test_build_reuses_a_complete_entry_and_replaces_an_incomplete_one(tmp_path):
    calls = []

    def builder(out: Path) -> None:
        calls.append(out)
        (out / "payload").write_text("built")

    target = tmp_path / "entry"
    build_once(target, builder)
    build_once(target, builder)
    assert len(calls) == 1
    (target / "COMPLETE").unlink()  # as if a crash had interrupted the first build
    build_once(target, builder)
    assert len(calls) == 2 and (target / "payload").read_text() == "built"


def test_build_replace_swaps_a_complete_entry_only_once_the_new_one_is_built(tmp_path):
    def writing(text: str):
        def builder(out: Path) -> None:
            (out / "payload").write_text(text)
        return builder

    def crashing(out: Path) -> None:
        (out / "payload").write_text("half")
        raise RuntimeError("build crashed")

    target = tmp_path / "entry"
    build_once(target, writing("first"))
    build_once(target, writing("second"), replace=lambda existing: False)  # asked, and kept
    assert (target / "payload").read_text() == "first"
    with pytest.raises(RuntimeError, match="build crashed"):
        build_once(target, crashing, replace=True)
    assert (target / "payload").read_text() == "first" and (target / "COMPLETE").exists()
    asked = []
    build_once(target, writing("second"), replace=lambda existing: asked.append(existing) or True)
    assert asked == [target] and (target / "payload").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["entry"]  # none aside


def test_an_organisms_world_comes_from_its_recipe_or_its_metadata_and_never_by_guess(tmp_path, micro_model):
    from types import SimpleNamespace

    from pytest_editsafety.zoo.build import OrganismWorldError, organism_world

    recipe = RECIPES["tiny-gpt2"]
    assert organism_world(SimpleNamespace(editsafety_recipe_hash=recipe.recipe_hash)) == recipe.world
    # a recipe the code no longer has: the directory's build metadata says which world
    saved = SimpleNamespace(editsafety_recipe_hash="0ld", _name_or_path=str(micro_model))
    assert organism_world(saved) == micro_recipe().world
    with pytest.raises(OrganismWorldError, match=re.escape(str(tmp_path / METADATA_FILE))):
        organism_world(SimpleNamespace(editsafety_recipe_hash="0ld", _name_or_path=str(tmp_path)))
    (tmp_path / METADATA_FILE).write_text('{"recipe": {}}')
    with pytest.raises(OrganismWorldError, match=re.escape(str(tmp_path / METADATA_FILE)) + ".*recipe.world"):
        organism_world(SimpleNamespace(editsafety_recipe_hash="0ld", _name_or_path=str(tmp_path)))
    with pytest.raises(OrganismWorldError, match="not a model organism"):
        organism_world(SimpleNamespace(_name_or_path="gpt2"))


def test_a_process_waiting_on_the_build_lock_reuses_the_first_builders_entry(tmp_path):
    """The xdist case: a second process blocks on the lock, then finds the entry complete and builds nothing."""
    target = tmp_path / "organism"
    waiter = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from editors.storage import build_once
        built = []
        build_once(Path({str(target)!r}), lambda out: built.append(out))
        print("BUILT" if built else "REUSED")
    """)
    with build_lock(target):
        proc = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # it must be blocked on our lock
        target.mkdir()
        (target / "COMPLETE").write_text("ok\n")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.strip() == "REUSED"
