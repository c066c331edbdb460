"""Second-moment statistics: streamed C against an explicit reference, the safetensors cache (one build
across processes, mismatches refused), and ROME's published ``.npz`` files read without pickle."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editors.stats import (
    ROME_COUNT_KEY,
    ROME_MOM2_KEY,
    RomeStatsError,
    SecondMomentCache,
    StatsCacheError,
    StatsError,
    StatsKey,
    compute_second_moment,
    covariance_for,
    find_rome_stats,
    load_rome_npz,
    read_entry,
    write_entry,
)
from editors.storage import build_lock
from editors.corpus import Corpus
from editors.families import FAMILIES

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
REPO_ROOT = Path(__file__).resolve().parents[1]

TEXTS = (
    "the cat sat on the mat",
    "a dog ran far away from the old house",
    "the quick brown fox jumps over the lazy dog near the river bank today",
    "birds sing",
    "the river runs past the house and the mill",
    "an old man walks his dog",
    "cat",
)


# --------------------------------------------------------------------------------------------------
# Tiny models and a tokenizer trained here


def _tokenizer(with_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config)


def _llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    """(model, tokenizer, family) for a tiny random model of each family."""
    if request.param == "gpt2":
        tokenizer = _tokenizer(with_bos=False)
        model = _gpt2(tokenizer)
    else:
        tokenizer = _tokenizer(with_bos=True)
        model = _llama(tokenizer)
    return model, tokenizer, FAMILIES[request.param]


def reference_keys(model, tokenizer, family, layer: int, texts, max_length: int) -> torch.Tensor:
    """Every token's key, one unpadded text at a time, gathered by a hook written here."""
    module = model.get_submodule(family.layer_name("mlp_out", layer))
    rows: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: rows.append(inputs[0][0].detach().clone()))
    try:
        model.eval()
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.cat(rows).to(torch.float64)


# --------------------------------------------------------------------------------------------------
# compute_second_moment


@pytest.mark.parametrize("layer", [0, 1])
def test_streamed_moment_matches_explicit_reference(setup, layer):
    model, tokenizer, family = setup
    tokenizer.padding_side = "right"
    C, n = compute_second_moment(model, tokenizer, family, layer, TEXTS, batch_size=3, max_length=128, progress=False)
    K = reference_keys(model, tokenizer, family, layer, TEXTS, 128)
    assert n == K.shape[0]
    assert C.dtype == torch.float32 and C.shape == (K.shape[1], K.shape[1])
    torch.testing.assert_close(C.double(), K.T @ K / K.shape[0], rtol=0, atol=1e-5)


def test_max_length_truncates_every_text(setup):
    model, tokenizer, family = setup
    tokenizer.padding_side = "right"
    C, n = compute_second_moment(model, tokenizer, family, 1, TEXTS, batch_size=4, max_length=4, progress=False)
    K = reference_keys(model, tokenizer, family, 1, TEXTS, 4)
    assert n == K.shape[0] == sum(min(4, len(tokenizer(t)["input_ids"])) for t in TEXTS)
    torch.testing.assert_close(C.double(), K.T @ K / K.shape[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_contribute(setup, side):
    model, tokenizer, family = setup
    tokenizer.padding_side = "right"
    C1, n1 = compute_second_moment(model, tokenizer, family, 1, TEXTS, batch_size=1, progress=False)
    tokenizer.padding_side = side
    try:
        CN, nN = compute_second_moment(model, tokenizer, family, 1, TEXTS, batch_size=len(TEXTS), progress=False)
    finally:
        tokenizer.padding_side = "right"
    assert nN == n1
    torch.testing.assert_close(CN, C1, rtol=0, atol=1e-5)
    # the batch really was padded: counting its pad positions would have changed the moment
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert n1 == sum(lengths) < max(lengths) * len(TEXTS)


def test_model_mode_and_grad_state_restored(setup):
    model, tokenizer, family = setup
    model.train()
    model.get_submodule(family.layer_name("block", 0)).eval()  # mixed modes must come back as they were
    before = {name: m.training for name, m in model.named_modules()}
    C, _ = compute_second_moment(model, tokenizer, family, 0, TEXTS[:2], progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not C.requires_grad
    model.eval()


def test_layers_above_the_module_are_not_run(setup):
    model, tokenizer, family = setup
    calls: list[int] = []
    head = model.get_submodule(family.layer_name("lm_head"))
    handle = head.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        compute_second_moment(model, tokenizer, family, 0, TEXTS[:3], progress=False)
    finally:
        handle.remove()
    assert calls == []
    # and hooks are gone afterwards: a normal forward pass reaches the head
    with torch.no_grad():
        model(input_ids=torch.tensor([tokenizer(TEXTS[0])["input_ids"]]))
    module = model.get_submodule(family.layer_name("mlp_out", 0))
    assert not module._forward_pre_hooks


def test_no_tokens_is_an_error(setup):
    model, tokenizer, family = setup
    with pytest.raises(StatsError, match="texts"):
        compute_second_moment(model, tokenizer, family, 0, [], progress=False)


# --------------------------------------------------------------------------------------------------
# StatsKey and the cache


def _key(**overrides) -> StatsKey:
    fields = dict(
        model_identity="organism-abc123", layer=1, module="transformer.h.1.mlp.c_proj",
        n_samples=7, corpus="tiny:0123", max_length=128,
    )
    fields.update(overrides)
    return StatsKey(**fields)


@pytest.mark.parametrize(
    "field,value",
    [("model_identity", "other"), ("layer", 2), ("module", "x.y"), ("dtype", "float64"),
     ("n_samples", 8), ("corpus", "tiny:4567"), ("max_length", 64)],
)
def test_every_key_field_changes_the_digest(field, value):
    assert _key(**{field: value}).digest() != _key().digest()
    assert _key().digest() == _key().digest()


@pytest.mark.parametrize("field,value", [("layer", -1), ("n_samples", 0), ("dtype", "int8"), ("corpus", "")])
def test_bad_key_fields_are_refused(field, value):
    with pytest.raises(StatsError, match=field):
        _key(**{field: value})


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    return a @ a.T / d


def test_cache_computes_once_and_reads_back(tmp_path):
    calls: list[int] = []
    value = _spd(5, 0)

    def compute():
        calls.append(1)
        return value, 42

    cache = SecondMomentCache(tmp_path)
    key = _key()
    first = cache.get(key, compute)
    assert calls == [1]
    assert cache.path_for(key).exists()
    assert cache.path_for(key).name.startswith(f"{key.module}-L{key.layer}-{key.digest()}")
    torch.testing.assert_close(first, value)
    assert cache.get(key, compute) is first
    # a fresh instance (another run) finds the file and does not compute either
    again = SecondMomentCache(tmp_path).get_entry(key, compute)
    assert calls == [1]
    assert again.token_count == 42
    torch.testing.assert_close(again.covariance, value)
    # a different key is a different file
    cache.get(_key(layer=0), compute)
    assert calls == [1, 1]


def test_cache_stores_the_keys_dtype(tmp_path):
    key = _key(dtype="float64")
    out = SecondMomentCache(tmp_path).get(key, lambda: (_spd(3, 1), 9))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("configured", [False, True])
def test_the_hubs_statistics_live_under_its_cache_root(tmp_path, monkeypatch, configured):
    """The cache has no root of its own (the owner passes one); the hub's is ``<cache root>/stats``, the cache
    root being HubOptions.cache_root when given, else $EDITSAFETY_CACHE."""
    from types import SimpleNamespace

    import editors.stats
    from pytest_editsafety.hub import HubOptions, ModelHub
    from pytest_editsafety.plan import build_plan

    with pytest.raises(TypeError):
        SecondMomentCache()  # type: ignore[call-arg]
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "env"))
    seen: dict = {}
    monkeypatch.setattr(editors.stats, "covariance_for", lambda *args, cache, **kwargs: seen.setdefault("cache", cache))
    options = HubOptions(cache_root=str(tmp_path / "configured")) if configured else HubOptions()
    hub = ModelHub(build_plan(["rome"], ["tiny-gpt2"], ["hard"], limit=1), options)
    monkeypatch.setattr(hub, "_corpus", lambda name: SimpleNamespace(name=name))  # no corpus is read
    state = SimpleNamespace(slug="tiny-gpt2", resources=None,
                            loaded=SimpleNamespace(model=None, tokenizer=None, family=None, identity="x"))
    hub._resources(state).second_moment(0, 10)
    assert seen["cache"].root == tmp_path / ("configured" if configured else "env") / "stats"


def _rebuilt(cache, key, path, caplog):
    """Get ``key`` over a bad file at ``path``: the warning names the file and the value is recomputed."""
    fresh = _spd(4, 3)
    calls: list[int] = []
    with caplog.at_level("WARNING", logger="editors.stats"):
        entry = cache.get_entry(key, lambda: (calls.append(1), (fresh, 11))[1])
    assert calls == [1]
    assert any(str(path) in r.getMessage() and "discarding" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(entry.covariance, fresh)
    assert entry.token_count == 11 and read_entry(path, key).token_count == 11
    return caplog.text


def test_file_of_another_key_is_discarded_and_rebuilt(tmp_path, caplog):
    cache = SecondMomentCache(tmp_path)
    key = _key()
    path = cache.path_for(key)
    write_entry(path, _key(corpus="tiny:ffff"), _spd(4, 2), 10)
    with pytest.raises(StatsCacheError) as err:
        read_entry(path, key)
    assert str(path) in str(err.value) and "corpus" in str(err.value)
    assert "corpus" in _rebuilt(cache, key, path, caplog)


def test_corrupted_file_is_discarded_and_rebuilt(tmp_path, caplog):
    cache = SecondMomentCache(tmp_path)
    key = _key()
    path = cache.path_for(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    _rebuilt(cache, key, path, caplog)


def _flip_one_float(path: Path) -> None:
    """Change one float of the tensor in place, leaving the header (and its recorded digest) as written."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 5] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_file_records_the_digest_of_its_tensor(tmp_path):
    from safetensors import safe_open

    from editors.stats import payload_sha256

    key = _key()
    path = SecondMomentCache(tmp_path).path_for(key)
    value = _spd(4, 5)
    write_entry(path, key, value, 10)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["payload_sha256"] == payload_sha256(value)
    assert read_entry(path, key).token_count == 10


def test_a_changed_float_is_caught_named_discarded_and_rebuilt(tmp_path, caplog):
    from editors.stats import StatsIntegrityError

    cache = SecondMomentCache(tmp_path)
    key = _key()
    path = cache.path_for(key)
    write_entry(path, key, _spd(4, 2), 10)
    _flip_one_float(path)
    with pytest.raises(StatsIntegrityError) as err:
        read_entry(path, key)
    assert str(path) in str(err.value) and "sha256" in str(err.value)
    assert "sha256" in _rebuilt(cache, key, path, caplog)


def test_a_file_without_a_digest_is_stale_and_rebuilt(tmp_path, caplog):
    """Files written before the digest existed carry every other field; they are recomputed, not trusted."""
    from safetensors.torch import save_file

    from editors.stats import CACHE_FORMAT, StatsIntegrityError

    cache = SecondMomentCache(tmp_path)
    key = _key()
    path = cache.path_for(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"C": _spd(4, 2)}, str(path), metadata={"format": CACHE_FORMAT, "token_count": "10", **key.fields()})
    with pytest.raises(StatsIntegrityError, match="payload_sha256"):
        read_entry(path, key)
    _rebuilt(cache, key, path, caplog)


def test_failed_compute_leaves_no_file(tmp_path):
    cache = SecondMomentCache(tmp_path)
    key = _key()

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.get(key, boom)
    assert not cache.path_for(key).exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert cache.get(key, lambda: (_spd(2, 4), 3)).shape == (2, 2)


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import contextlib, json, sys
    from pathlib import Path
    import editors.stats as stats

    real_lock = stats.build_lock

    @contextlib.contextmanager
    def announced_lock(target, *args, **kwargs):
        # tell the parent we have looked for the file, found none, and are about to wait for the lock
        print("waiting", flush=True)
        with real_lock(target, *args, **kwargs):
            yield

    stats.build_lock = announced_lock
    root, fields = Path(sys.argv[1]), json.loads(sys.argv[2])
    called = []

    def compute():
        import torch
        called.append(1)
        return torch.eye(4), 1

    value = stats.SecondMomentCache(root).get(stats.StatsKey(**fields), compute)
    print(json.dumps({"computed": bool(called), "value": value.tolist()}), flush=True)
    """
)


def test_second_process_waiting_on_the_lock_reuses_the_file(tmp_path):
    root = tmp_path / "stats"
    key = _key()
    path = SecondMomentCache(root).path_for(key)
    script = tmp_path / "child.py"
    script.write_text(SUBPROCESS_SCRIPT)
    value = _spd(4, 5)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with build_lock(path):
        child = subprocess.Popen(
            [sys.executable, str(script), str(root), json.dumps(dataclasses.asdict(key))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            ready, _, _ = select.select([child.stdout], [], [], 120)
            line = child.stdout.readline() if ready else ""
            if line.strip() != "waiting":
                child.kill()
                pytest.fail(f"child did not reach the lock: {line!r} {child.stderr.read()}")
            time.sleep(0.3)  # let it block on the lock
            write_entry(path, key, value, 11)
        except BaseException:
            child.kill()
            raise
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["computed"] is False
    torch.testing.assert_close(torch.tensor(report["value"]), value)


# --------------------------------------------------------------------------------------------------
# ROME's .npz files


def _rome_npz(path: Path, mom2: np.ndarray, count, **extra) -> Path:
    """A file shaped like the one ROME's statistics code writes (its keys and its string constructor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        ROME_MOM2_KEY: mom2,
        ROME_COUNT_KEY: np.array(count),
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "sample_size": np.array(100000),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


@SETTINGS
@given(d=st.integers(1, 6), count=st.integers(1, 10**6), seed=st.integers(0, 2**16))
def test_rome_npz_is_mom2_over_count(tmp_path_factory, d, count, seed):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(d + 3, d))
    mom2 = (keys.T @ keys * count).astype(np.float32)
    path = _rome_npz(tmp_path_factory.mktemp("npz") / "s.npz", mom2, count)
    C = load_rome_npz(path)
    assert C.dtype == torch.float32 and C.shape == (d, d)
    np.testing.assert_allclose(C.numpy(), mom2.astype(np.float64) / count, rtol=1e-6, atol=1e-6)


def test_rome_npz_with_mean_arrays_still_loads(tmp_path):
    mom2 = np.eye(3, dtype=np.float64) * 6.0
    path = _rome_npz(tmp_path / "s.npz", mom2, 3, **{"mean.mean": np.zeros(3), "mean.count": np.array(3)})
    torch.testing.assert_close(load_rome_npz(path), torch.eye(3) * 2.0)


@pytest.mark.parametrize("missing", [ROME_MOM2_KEY, ROME_COUNT_KEY])
def test_rome_npz_missing_key_names_file_and_key(tmp_path, missing):
    arrays = {ROME_MOM2_KEY: np.eye(2), ROME_COUNT_KEY: np.array(2)}
    del arrays[missing]
    path = tmp_path / "partial.npz"
    np.savez(path, **arrays)
    with pytest.raises(RomeStatsError) as err:
        load_rome_npz(path)
    assert str(path) in str(err.value) and repr(missing) in str(err.value)


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: the file appearing would prove the loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("key", [ROME_MOM2_KEY, ROME_COUNT_KEY])
def test_rome_npz_object_arrays_are_refused(tmp_path, key):
    marker = tmp_path / "unpickled"
    arrays = {ROME_MOM2_KEY: np.eye(2), ROME_COUNT_KEY: np.array(2)}
    payload = np.empty((1,), dtype=object)
    payload[0] = _TouchOnUnpickle(marker)
    arrays[key] = payload
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(RomeStatsError, match="unpickling") as err:
        load_rome_npz(path)
    assert str(path) in str(err.value) and repr(key) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "mom2,count,match",
    [(np.ones((2, 3)), 2, "square"), (np.eye(2), 0, "positive"), (np.eye(2), np.array([1, 2]), "single"),
     (np.array([[np.nan, 0], [0, 1]]), 2, "non-finite"), (np.eye(2, dtype=np.int64), 2, "floating")],
)
def test_rome_npz_bad_content_is_refused(tmp_path, mom2, count, match):
    path = _rome_npz(tmp_path / "bad.npz", mom2, count)
    with pytest.raises(RomeStatsError, match=match) as err:
        load_rome_npz(path)
    assert str(path) in str(err.value)


def test_rome_npz_not_an_archive(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(RomeStatsError, match="garbage.npz"):
        load_rome_npz(garbage)
    with pytest.raises(RomeStatsError, match="does not exist"):
        load_rome_npz(tmp_path / "absent.npz")


def test_find_rome_stats_layout(tmp_path):
    module = "transformer.h.5.mlp.fc_out"
    assert find_rome_stats(tmp_path, "EleutherAI/gpt-j-6B", module) is None
    nested = tmp_path / "EleutherAI_gpt-j-6B" / "wikipedia_stats" / f"{module}_float32_mom2_100000.npz"
    _rome_npz(nested, np.eye(2), 1)
    assert find_rome_stats(tmp_path, "EleutherAI/gpt-j-6B", module) == nested
    assert find_rome_stats(tmp_path, "EleutherAI/gpt-j-6B", module, sample_size=20000) is None
    assert find_rome_stats(tmp_path, "EleutherAI/gpt-j-6B", module, precision="float64") is None
    assert find_rome_stats(tmp_path, "gpt2-xl", module) is None
    flat = _rome_npz(tmp_path / "transformer.h.17.mlp.c_proj_float32_mom2_100000.npz", np.eye(2), 1)
    assert find_rome_stats(tmp_path, "gpt2-xl", "transformer.h.17.mlp.c_proj") == flat
    whole = _rome_npz(tmp_path / "gpt2-xl" / "wikitext_stats" / "m_float32_mom2.npz", np.eye(2), 1)
    assert find_rome_stats(tmp_path, "gpt2-xl", "m", sample_size=None, dataset="wikitext") == whole
    with pytest.raises(RomeStatsError, match="nowhere"):
        find_rome_stats(tmp_path / "nowhere", "gpt2-xl", module)


# --------------------------------------------------------------------------------------------------
# covariance_for


def _corpus() -> Corpus:
    return Corpus.from_texts("tiny", TEXTS)


def test_covariance_for_computes_through_the_cache(tmp_path, setup):
    model, tokenizer, family = setup
    tokenizer.padding_side = "right"
    cache = SecondMomentCache(tmp_path)
    C = covariance_for(model, tokenizer, family, 1, identity="tiny-test", corpus=_corpus(), cache=cache,
                       n_samples=5, max_length=32, progress=False, check=False)
    expected, n = compute_second_moment(model, tokenizer, family, 1, TEXTS[:5], max_length=32, progress=False)
    torch.testing.assert_close(C, expected, rtol=0, atol=1e-6)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    assert read_entry(files[0], _key_of(files[0])).token_count == n


def _key_of(path: Path) -> StatsKey:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    return StatsKey(
        model_identity=meta["model_identity"], layer=int(meta["layer"]), module=meta["module"],
        dtype=meta["dtype"], n_samples=int(meta["n_samples"]), corpus=meta["corpus"],
        max_length=int(meta["max_length"]),
    )


def test_covariance_for_prefers_rome_file(tmp_path, setup):
    model, tokenizer, family = setup
    module = family.layer_name("mlp_out", 0)
    d_in = reference_keys(model, tokenizer, family, 0, TEXTS[:1], 8).shape[1]
    mom2 = (np.eye(d_in) * 4.0).astype(np.float32)
    stats_dir = tmp_path / "rome"
    _rome_npz(stats_dir / "org_tiny" / "wikipedia_stats" / f"{module}_float32_mom2_100000.npz", mom2, 2)
    cache = SecondMomentCache(tmp_path / "cache")
    C = covariance_for(model, tokenizer, family, 0, identity="tiny-test", corpus=_corpus(), cache=cache,
                       stats_dir=stats_dir, rome_model_name="org/tiny", progress=False, check=False)
    torch.testing.assert_close(C, torch.eye(d_in) * 2.0)
    assert not (tmp_path / "cache").exists()  # nothing computed
    # no file for layer 1 under stats_dir: it falls back to computing
    C1 = covariance_for(model, tokenizer, family, 1, identity="tiny-test", corpus=_corpus(), cache=cache,
                        stats_dir=stats_dir, rome_model_name="org/tiny", progress=False, check=False)
    assert C1.shape == (d_in, d_in) and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_covariance_for_rejects_rome_file_of_wrong_width(tmp_path, setup):
    model, tokenizer, family = setup
    module = family.layer_name("mlp_out", 0)
    path = _rome_npz(tmp_path / f"{module}_float32_mom2_100000.npz", np.eye(3, dtype=np.float32), 1)
    with pytest.raises(RomeStatsError) as err:
        covariance_for(model, tokenizer, family, 0, identity="t", corpus=_corpus(),
                       cache=SecondMomentCache(tmp_path / "c"), stats_dir=tmp_path, rome_model_name="m")
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------------
# Batches by a token budget


@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=60), budget=st.integers(1, 200),
       cap=st.one_of(st.none(), st.integers(1, 10)))
@SETTINGS
def test_token_batches_cover_every_text_once_within_the_budget(lengths, budget, cap):
    from editors.stats import token_batches

    batches = token_batches(lengths, budget, max_texts=cap)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        padded_size = len(batch) * max(max(lengths[i] for i in batch), 1)
        assert padded_size <= budget or len(batch) == 1  # a text longer than the budget goes alone
        assert cap is None or len(batch) <= cap


@pytest.mark.parametrize("batch_tokens", [1, 7, 30, 10_000])
def test_token_budget_does_not_change_the_statistic(setup, batch_tokens):
    model, tokenizer, family = setup
    tokenizer.padding_side = "right"
    reference, n_ref = compute_second_moment(model, tokenizer, family, 1, TEXTS, batch_size=1, progress=False)
    C, n = compute_second_moment(model, tokenizer, family, 1, TEXTS, batch_tokens=batch_tokens, progress=False)
    assert n == n_ref
    torch.testing.assert_close(C, reference, rtol=1e-5, atol=1e-6)


def test_progress_counts_tokens_against_a_known_total(setup, monkeypatch):
    """The bar's total is the token count, known before the pass, so tqdm's ETA means something."""
    import tqdm.auto

    model, tokenizer, family = setup
    bars: list = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        bar = real(*args, **kwargs)
        bars.append(bar)
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    _, n = compute_second_moment(model, tokenizer, family, 0, TEXTS, batch_tokens=16, progress=True)
    assert bars[0].total == n and bars[0].n == n and bars[0].unit == "tok"


# --------------------------------------------------------------------------------------------------
# Refusing an ill-posed C


def test_organism_like_conditioning_is_accepted_and_too_few_tokens_refused():
    from editors.maths.moments import assess_second_moment, second_moment_problems

    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -3.5, 32, dtype=torch.float64)  # condition ~1e7, like the organisms' C
    keys = torch.randn(640, 32, generator=g, dtype=torch.float64) * scales
    good = assess_second_moment((keys.T @ keys / 640).float(), 640)
    assert good.rank == 32 and 1e5 < good.condition < 1e10 and good.well_sampled
    assert second_moment_problems(good) == []
    few = assess_second_moment((keys[:20].T @ keys[:20] / 20).float(), 20)
    problems = second_moment_problems(few)
    assert few.rank <= 24 and any("fewer than the key dimension 32" in p for p in problems)
    assert any("numerical rank" in p for p in problems)


def test_condition_beyond_the_limit_is_refused_with_the_number():
    from editors.maths.moments import assess_second_moment, second_moment_problems

    from editors.maths.moments import second_moment_concerns

    C = torch.diag(torch.tensor([1.0, 1.0, 1e-11], dtype=torch.float64))
    quality = assess_second_moment(C, 20)  # thin: under 10 keys per dimension
    assert quality.rank == 3
    (problem,) = second_moment_problems(quality)
    assert "condition number 1e+11 exceeds 1e+10" in problem
    # well sampled, the same conditioning is the model's: reported, not refused
    rich = assess_second_moment(C, 1000)
    assert second_moment_problems(rich) == [] and "condition number" in second_moment_concerns(rich)[0]


def test_covariance_for_refuses_a_c_from_too_few_tokens_with_the_numbers(tmp_path, setup):
    from editors.stats import IllPosedStatsError

    model, tokenizer, family = setup
    with pytest.raises(IllPosedStatsError) as err:
        covariance_for(model, tokenizer, family, 1, identity="tiny-test", corpus=_corpus(),
                       cache=SecondMomentCache(tmp_path), n_samples=2, progress=False)
    message = str(err.value)
    d = reference_keys(model, tokenizer, family, 1, TEXTS[:1], 8).shape[1]
    assert f"key dimension {d}" in message and "tokens" in message and "numerical rank" in message
    assert "condition number" in message and "mom2_n_samples" in message and "--editsafety-stats-dir" in message
    # the measured numbers are stored with the statistic, so a later read does not measure again
    (path,) = tmp_path.glob("*.safetensors")
    assert read_entry(path, _key_of(path)).quality is not None


def test_covariance_for_accepts_a_well_sampled_c_and_reads_the_corpus_lazily(tmp_path, setup):
    model, tokenizer, family = setup
    d = reference_keys(model, tokenizer, family, 0, TEXTS[:1], 8).shape[1]
    module = family.layer_name("mlp_out", 0)
    _rome_npz(tmp_path / f"{module}_float32_mom2_100000.npz", (np.eye(d) * 50 * d).astype(np.float32), 50 * d)
    C = covariance_for(model, tokenizer, family, 0, identity="t", cache=SecondMomentCache(tmp_path / "c"),
                       corpus=lambda: pytest.fail("a ROME file answers: the corpus must not be read"),
                       stats_dir=tmp_path, rome_model_name="m", progress=False)
    torch.testing.assert_close(C, torch.eye(d))
    # ROME's own count is the token count: a file from fewer keys than dimensions is refused
    from editors.stats import IllPosedStatsError

    _rome_npz(tmp_path / f"{module}_float32_mom2_10.npz", np.eye(d, dtype=np.float32), 3)
    with pytest.raises(IllPosedStatsError, match="ROME statistics file"):
        covariance_for(model, tokenizer, family, 0, identity="t", cache=SecondMomentCache(tmp_path / "c"),
                       corpus=_corpus, stats_dir=tmp_path, rome_model_name="m", n_samples=10, progress=False)
