"""MEND: the maths by hand, the editor's update against autograd's gradient, restore, archives, training.

Model-level tests use the micro organism (2 layers, 32 wide; built in seconds by the session fixture) and
train networks of a few steps: what is pinned is the mechanism (the update is the network applied to the
gradient's factors; archives are checked and refused), not the organism-scale quality, which the README
reports from a certification run.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from editors.base import EditRequest, Needs, Provided, TrainedNetworkNeed, TrainingCase
from editors.ft import per_request_nll, target_batch
from editors.maths import as_out_in
from editors.maths.mend import (
    NORM_EPS,
    FactorNorm,
    MomentAccumulator,
    ResidualBlock,
    assemble_update,
    mend_update,
    nonzero_tokens,
    transform_factors,
)
from editors.hooks import frozen
from editors.mend import TRAIN_HINT, MendEditor
from editors.mend_network import MendHparams, MendNetwork, edit_targets, gradient_factors
from editors.mend_archive import (
    ARCHIVE_FORMAT,
    CONFIG_FILE,
    TENSORS_FILE,
    MendArchiveError,
    MendArchiveMismatchError,
    default_identity,
    load_archive,
    read_config,
    save_archive,
)
from editors.provision import ProvisionError, SimpleProvider, set_up
from editors.restore import edit_session, model_digest, tensor_digest
from pytest_editsafety.trained import (
    TrainedNetworkMissingError,
    locate_network,
    network_dir,
    read_record,
    train_network,
)

REQUEST = EditRequest("Toko Yasuda", "{} plays the", "violin")
# a network of a few steps: enough to exercise every part of training on the micro organism
MICRO = dict(layers=(1,), modules=("mlp_in", "mlp_out"), rank=8, n_hidden=1, edit_lr=1e-2, lr=1e-3, lr_lr=1e-3,
             steps=6, batch_size=3, norm_batches=2, seed=7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def micro(micro_model: Path):
    from pytest_editsafety.registry import load_model

    return load_model(str(micro_model))


def _need(loaded, hp: MendHparams) -> TrainedNetworkNeed:
    """The trained network MEND declares it needs for ``loaded`` with ``hp`` (no archive named)."""
    need = MendEditor(hp).needs(loaded.model, loaded.family).trained_network
    assert need is not None
    return need


def _micro_cases(loaded, n: int = 12):
    from pytest_editsafety.trained import organism_training_data

    cases, data = organism_training_data(loaded.model, _need(loaded, MendHparams(**{**MICRO, "steps": 1,
                                                                                    "batch_size": n})))
    assert len(cases) == n and all(isinstance(c, TrainingCase) for c in cases)
    return cases, data


# ---------------------------------------------------------------------------------------------- maths


def _block(u, v, bias, scale, shift) -> ResidualBlock:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return ResidualBlock(t(u), t(v), t(bias), t(scale), t(shift))


def test_update_by_hand_on_a_tiny_layer() -> None:
    # d_in = 2, d_out = 1, two tokens; one block over 3 features, rank 1, two modes (mode 1 used)
    u = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    delta = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    f64 = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # std + NORM_EPS is exactly the divisor written in the comments below
    norm = FactorNorm(u_mean=f64(1.0, 1.0), u_std=f64(1.0, 1.0) - NORM_EPS, delta_mean=f64(0.0),
                      delta_std=f64(2.0) - NORM_EPS)
    block = _block(u=[[1.0], [0.0], [2.0]], v=[[1.0, 0.0, 0.0]], bias=[0.0, 0.0, -1.0],
                   scale=[[9.0, 9.0, 9.0], [2.0, 1.0, 1.0]], shift=[[9.0, 9.0, 9.0], [0.0, 0.5, 0.0]])
    # normalised inputs x = [(u - 1) / 1, delta / 2]: token 0 -> [0, 1, 0.25], token 1 -> [2, -1, -0.5]
    # token 0: V x = 0, pre = b = [0, 0, -1] -> * [2, 1, 1] + [0, 0.5, 0] = [0, 0.5, -1] -> clamp [0, 0.5, 0]
    #          y = [0, 1.5, 0.25]
    # token 1: V x = 2, pre = 2 U + b = [2, 0, 3] -> [4, 0.5, 3], y = [6, -0.5, 2.5]
    u_tilde, delta_tilde = transform_factors(u, delta, norm, [block], mode=1)
    assert torch.allclose(u_tilde, torch.tensor([[0.0, 1.5], [6.0, -0.5]], dtype=torch.float64))
    assert torch.allclose(delta_tilde, torch.tensor([[0.25], [2.5]], dtype=torch.float64))
    # ΔW = −0.1 (0.25 [0, 1.5] + 2.5 [6, −0.5]) = −0.1 [15, −0.875]
    expected = torch.tensor([[-1.5, 0.0875]], dtype=torch.float64)
    assert torch.allclose(mend_update(u, delta, norm, [block], 1, 0.1), expected)
    # a token left out of the sum contributes nothing: only token 0 -> −0.1 · 0.25 [0, 1.5]
    only_first = mend_update(u, delta, norm, [block], 1, 0.1, mask=torch.tensor([True, False]))
    assert torch.allclose(only_first, torch.tensor([[0.0, -0.0375]], dtype=torch.float64))


def test_identity_start_is_a_normalised_gradient_step() -> None:
    gen = torch.Generator().manual_seed(0)
    u, delta = torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)
    norm = FactorNorm(torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5,
                      torch.randn(2, generator=gen), torch.rand(2, generator=gen) + 0.5)
    zero_u = ResidualBlock(torch.zeros(5, 4), torch.randn(4, 5, generator=gen), torch.zeros(5), torch.ones(1, 5),
                           torch.zeros(1, 5))
    got = mend_update(u, delta, norm, [zero_u, zero_u], 0, 0.3)
    u_n = (u - norm.u_mean) / (norm.u_std + NORM_EPS)
    d_n = (delta - norm.delta_mean) / (norm.delta_std + NORM_EPS)
    assert torch.allclose(got, -0.3 * d_n.T @ u_n, atol=1e-6)


def test_zero_factor_tokens_are_dropped_and_moments_are_unbiased() -> None:
    u = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [2.0, 1.0]]])
    delta = torch.tensor([[[0.0], [1.0], [3.0]]])
    assert nonzero_tokens(u, delta).tolist() == [[False, False, True]]
    with pytest.raises(ValueError, match="mask"):
        assemble_update(u, delta, 1.0, mask=torch.ones(3, dtype=torch.bool))
    acc = MomentAccumulator(2)
    rows = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    acc.add(rows[:2])
    acc.add(rows[2:])
    mean, std = acc.mean_std()
    assert torch.allclose(mean, rows.mean(0)) and torch.allclose(std, rows.std(0))


# ---------------------------------------------------------------------------------------------- the editor


def _random_network(loaded, hp: MendHparams) -> MendNetwork:
    """A network with every parameter away from its identity start, so the check covers all of them."""
    targets = edit_targets(loaded.model, loaded.family, hp.layers, hp.modules)
    network = MendNetwork(targets, rank=hp.rank, n_hidden=hp.n_hidden, edit_lr=hp.edit_lr, seed=1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, tensor in network.named_parameters():
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=gen))
        for net in network.nets.values():
            net.u_mean.copy_(0.1 * torch.randn(net.d_in, generator=gen))
            net.u_std.copy_(torch.rand(net.d_in, generator=gen) + 0.5)
            net.delta_mean.copy_(1e-3 * torch.randn(net.d_out, generator=gen))
            net.delta_std.copy_(1e-2 * (torch.rand(net.d_out, generator=gen) + 0.5))
    return network


def test_update_is_the_network_applied_to_the_gradient_factors(micro) -> None:
    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    hp = MendHparams(**MICRO)
    network = _random_network(micro, hp)
    editor = MendEditor(hp, network=network)
    targets = network.targets
    assert [t.name for t in targets] == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]

    # the factors by plain autograd: module inputs from hooks, output gradients retained, and W.grad as a check
    inputs, outputs = {}, {}
    handles = []
    for t in targets:
        module = family.get_module(model, t.module)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=t.name: inputs.__setitem__(n, a[0].detach())))

        def keep(m, a, out, n=t.name):
            out.retain_grad()
            outputs[n] = out

        handles.append(module.register_forward_hook(keep))
    for p in model.parameters():
        p.grad = None
    batch = target_batch(tokenizer, [REQUEST], "cpu")
    per_request_nll(model, batch, 1).sum().backward()
    for h in handles:
        h.remove()
    before = {t.name: as_out_in(family.get_module(model, t.module).weight.detach().clone(), True) for t in targets}

    expected = {}
    for index, t in enumerate(targets):
        u, delta = inputs[t.name][0].double(), outputs[t.name].grad[0].double()
        grad = as_out_in(family.get_module(model, t.module).weight.grad, True).double()
        assert torch.allclose(delta.T @ u, grad, atol=1e-9), "Σ δ uᵀ must be the weight's gradient"
        net = network.nets[t.group]
        dw = torch.zeros(t.d_out, t.d_in, dtype=torch.float64)
        for tok in range(u.shape[0]):  # token by token, as the paper writes it
            if not (u[tok].any() and delta[tok].any()):
                continue
            x = torch.cat([(u[tok] - net.u_mean.double()) / (net.u_std.double() + NORM_EPS),
                           (delta[tok] - net.delta_mean.double()) / (net.delta_std.double() + NORM_EPS)])
            for j in range(hp.n_hidden + 1):
                p = lambda name: getattr(net, f"{name}{j}").detach().double()  # noqa: E731
                pre = p("u") @ (p("v") @ x) + p("bias")
                pre = pre * p("scale")[t.mode] + p("shift")[t.mode]
                x = x + pre.clamp(min=0)
            dw -= float(network.edit_lrs[index].detach()) * torch.outer(x[t.d_in:], x[: t.d_in])
        expected[t.name] = dw
    for p in model.parameters():
        p.grad = None

    names = editor.parameters_touched(model, family)
    with edit_session(model, names):
        outcome = editor.apply(model, tokenizer, family, [REQUEST])
        for t in targets:
            after = as_out_in(family.get_module(model, t.module).weight.detach(), True)
            got = (after.double() - before[t.name].double())
            assert torch.allclose(got, expected[t.name], rtol=1e-4, atol=1e-6), t.name
            fro = float(expected[t.name].norm())
            assert outcome.diagnostics[f"delta_fro_{t.kind}_l1"] == pytest.approx(fro, rel=1e-4)
    assert outcome.edited == names
    for key, value in outcome.diagnostics.items():
        assert type(value) in (float, int, str), key
    assert outcome.diagnostics["final_nll"] != outcome.diagnostics["initial_nll"]


def test_apply_changes_only_its_weights_and_restores_bit_exactly(micro) -> None:
    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    hp = MendHparams(**MICRO)
    editor = MendEditor(hp, network=_random_network(micro, hp))
    params = dict(model.named_parameters())
    digests = {name: tensor_digest(p) for name, p in params.items()}
    flags = {name: p.requires_grad for name, p in params.items()}
    whole = model_digest(model)
    names = editor.parameters_touched(model, family)
    with edit_session(model, names):
        editor.apply(model, tokenizer, family, [REQUEST])
        editor.apply(model, tokenizer, family, [EditRequest("Apple", "{} was acquired by", "Nokia")])  # sequential
        changed = {name for name, p in params.items() if tensor_digest(p) != digests[name]}
        assert changed == set(names)
    assert model_digest(model) == whole
    assert {name: p.requires_grad for name, p in params.items()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_factors_do_not_depend_on_other_requests_in_the_batch(micro) -> None:
    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    targets = edit_targets(model, family, (1,), ("mlp_out",))
    other = EditRequest("Apple", "{} was acquired by the company", "Nokia")
    with frozen(model):
        alone, _ = gradient_factors(model, family, targets, target_batch(tokenizer, [REQUEST], "cpu"), 1)
        both, _ = gradient_factors(model, family, targets, target_batch(tokenizer, [REQUEST, other], "cpu"), 2)
    a, b = alone[targets[0].name], both[targets[0].name]
    n = a.u.shape[1]
    assert torch.allclose(a.delta[0], b.delta[0, :n], atol=1e-7) and torch.equal(a.mask[0], b.mask[0, :n])
    assert not b.mask[0, n:].any()  # padding carries no term


# ---------------------------------------------------------------------------------------------- archives


def test_trained_archive_round_trips_and_is_refused_for_another_model(micro, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    hp = MendHparams(**MICRO)
    need = _need(micro, hp)
    cases, data = _micro_cases(micro)
    path, trained = train_network(need, model, tokenizer, family, cases, data, identity=micro.identity,
                                  progress=False, root=tmp_path)
    assert trained and path == network_dir(need, micro.identity, "torch.float32", tmp_path)
    assert path.parent == tmp_path / "mend"  # the need's kind names the cache folder
    assert path != network_dir(need, micro.identity, "torch.bfloat16", tmp_path)  # the dtype is in the key
    assert path != network_dir(need, "someone/else@1", "torch.float32", tmp_path)  # and the model's identity
    other = _need(micro, MendHparams(**{**MICRO, "rank": 4}))
    assert path != network_dir(other, micro.identity, "torch.float32", tmp_path)  # and the network's hparams
    assert sorted(p.name for p in path.iterdir()) == sorted(["COMPLETE", CONFIG_FILE, TENSORS_FILE, "trained.json"])
    config = read_config(path)
    assert config["model"]["identity"] == micro.identity and config["data"]["sha256"] == data["sha256"]
    assert config["model"]["dtype"] == "torch.float32"
    record = read_record(path)
    assert record["data"] == data and record["training"]["edit_lrs"] == config["training"]["edit_lrs"]
    assert train_network(need, model, tokenizer, family, cases, data, identity=micro.identity, progress=False,
                         root=tmp_path) == (path, False)

    # loading reads JSON and safetensors only: anything that unpickles fails the test
    def no_unpickling(*args, **kwargs):
        raise AssertionError("an archive must never be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    network = load_archive(path, model, family, hp, identity=micro.identity)
    assert network.edit_lrs.tolist() == pytest.approx(config["training"]["edit_lrs"])

    with pytest.raises(MendArchiveMismatchError) as err:
        load_archive(path, model, family, hp, identity="openai-community/gpt2-xl@abc")
    message = str(err.value)
    assert micro.identity in message and "openai-community/gpt2-xl@abc" in message
    assert "editsafety train --editor mend --model" in message
    # the same identity but other weights named by the hyper-parameters: refused too
    with pytest.raises(MendArchiveMismatchError, match=re.escape("transformer.h.0.mlp.c_fc.weight")):
        load_archive(path, model, family, MendHparams(**{**MICRO, "layers": (0,)}), identity=micro.identity)

    # a tampered tensors file is caught by its recorded sha256
    (path / TENSORS_FILE).write_bytes((path / TENSORS_FILE).read_bytes()[:-8])
    with pytest.raises(MendArchiveError, match="sha256"):
        load_archive(path, model, family, hp, identity=micro.identity)


def test_mend_declares_a_trained_network_unless_an_archive_is_named(micro) -> None:
    hp = MendHparams(**MICRO)
    need = _need(micro, hp)
    assert (need.kind, dict(need.key)) == ("mend", hp.network_key())
    assert (need.n_training_cases, need.seed) == (MICRO["steps"] * MICRO["batch_size"], MICRO["seed"])
    assert "editsafety train --editor mend" in need.train_hint
    # the network's key: everything it depends on but where an archive is
    assert _need(micro, MendHparams(**{**MICRO, "archive": ""})).key == need.key
    assert MendEditor(MendHparams(**{**MICRO, "archive": "/some/archive"})).needs(micro.model, micro.family) == Needs()


def test_editor_setup_uses_the_archive_and_refuses_one_for_another_model(micro, tmp_path: Path) -> None:
    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    hp = MendHparams(**MICRO)
    cases, data = _micro_cases(micro)
    path, _ = train_network(_need(micro, hp), model, tokenizer, family, cases, data,
                            identity="someone/other-model@123", progress=False, root=tmp_path)
    editor = MendEditor(MendHparams(**{**MICRO, "archive": str(path)}))
    with pytest.raises(ValueError, match="set the editor up first"):
        editor.apply(model, tokenizer, family, [REQUEST])
    with pytest.raises(MendArchiveMismatchError, match="'someone/other-model@123'"):
        editor.setup(model, tokenizer, family, Provided(identity=micro.identity))
    # a caller that names no identity: the one the model's config implies (its name and commit)
    with pytest.raises(MendArchiveMismatchError, match=re.escape(repr(default_identity(model)))):
        editor.setup(model, tokenizer, family, Provided())
    assert editor.provenance() == {}
    set_up(editor, model, tokenizer, family, SimpleProvider(model, tokenizer, identity="someone/other-model@123"))
    assert editor.archive_path == path
    # which trained network edits: what the harness records in every test's metadata
    assert editor.provenance() == {"archive_sha256": read_config(path)["tensors_sha256"],
                                   "archive_dtype": "torch.float32"}
    with edit_session(model, editor.parameters_touched(model, family)):
        outcome = editor.apply(model, tokenizer, family, [REQUEST])
    assert outcome.diagnostics["delta_fro"] > 0

    # without an archive named, the provided network is the one opened
    provided = MendEditor(hp)
    set_up(provided, model, tokenizer, family,
           SimpleProvider(model, tokenizer, identity="someone/other-model@123", trained_network=path))
    assert provided.archive_path == path and provided.provenance() == editor.provenance()
    with pytest.raises(ValueError, match="no trained network was provided"):
        MendEditor(hp).setup(model, tokenizer, family, Provided(identity=micro.identity))


def test_a_real_model_without_an_archive_gets_the_training_command(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from editors.families import family_for_model_type

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    family = family_for_model_type("gpt2")
    need = MendEditor(MendHparams(**MICRO)).needs(model, family).trained_network
    with pytest.raises(TrainedNetworkMissingError, match="editsafety train --editor mend --model") as err:
        locate_network(need, model, None, family, identity="x/y@1", root=tmp_path)
    assert "'x/y@1'" in str(err.value) and str(tmp_path / "mend") in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing was trained for a model that is no organism
    # a caller outside the harness with no network at hand gets the same command
    with pytest.raises(ProvisionError, match="no trained mend network given; train one with `editsafety train"):
        set_up(MendEditor(MendHparams(**MICRO)), model, None, family, SimpleProvider(model, None))
    assert TRAIN_HINT in need.train_hint


def test_training_on_other_data_replaces_the_entry_once_the_new_one_is_complete(micro, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import editors.mend_train

    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    need = _need(micro, MendHparams(**MICRO))
    cases, data = _micro_cases(micro)
    path, _ = train_network(need, model, tokenizer, family, cases, data, identity=micro.identity, progress=False,
                            root=tmp_path)
    other = {**data, "sha256": "other data", "source": "somewhere else"}

    def crash(*args, **kwargs):
        raise RuntimeError("training crashed")

    with monkeypatch.context() as patched:
        patched.setattr(editors.mend_train, "train_mend", crash)
        with pytest.raises(RuntimeError, match="training crashed"):
            train_network(need, model, tokenizer, family, cases[:6], other, identity=micro.identity,
                          progress=False, root=tmp_path)
    assert read_config(path)["data"]["sha256"] == data["sha256"]  # a failed retraining left the old entry
    assert read_record(path)["data"]["sha256"] == data["sha256"]
    again, trained = train_network(need, model, tokenizer, family, cases[:6], other, identity=micro.identity,
                                   progress=False, root=tmp_path)
    assert (again, trained) == (path, True) and read_config(path)["data"]["sha256"] == "other data"
    assert read_record(path)["data"]["sha256"] == "other data"
    assert not [p for p in path.parent.iterdir() if p.suffix in (".tmp", ".old")]  # nothing left aside


def _config(targets: int = 3) -> dict:
    target = {"name": "transformer.h.1.mlp.c_fc.weight", "layer": 1, "kind": "mlp_in", "d_out": 64, "d_in": 32,
              "transposed": True, "group": "64x32", "mode": 0}
    return {"format": ARCHIVE_FORMAT, "model": {"identity": "x", "model_type": "gpt2", "family": "gpt2",
                                                "dtype": "torch.float32"},
            "targets": [dict(target) for _ in range(targets)], "network": {"rank": 8, "n_hidden": 1},
            "hparams": {}, "data": {}, "training": {}, "tensors_sha256": "0" * 64}


def _parent(config: dict, path: str) -> tuple[dict | list, str]:
    """The container holding the dotted ``path`` ("targets.2.layer") and the last key."""
    *parents, last = path.split(".")
    for key in parents:
        config = config[int(key)] if isinstance(config, list) else config[key]
    return config, last


def _drop(path: str):
    def edit(config: dict) -> None:
        parent, last = _parent(config, path)
        del parent[last]
    return edit


def _set(path: str, value):
    def edit(config: dict) -> None:
        parent, last = _parent(config, path)
        parent[int(last) if isinstance(parent, list) else last] = value
    return edit


@pytest.mark.parametrize(("edit", "field"), [
    (_drop("targets.2.layer"), "field targets[2].layer is missing"),
    (_set("targets.2.layer", "one"), "field targets[2].layer must be an integer"),
    (_set("targets.0.transposed", "yes"), "field targets[0].transposed must be true or false"),
    (_set("targets.1", 7), "field targets[1] must be an object"),
    (_set("targets", {}), "field targets must be a list"),
    (_set("model", []), "field model must be an object"),
    (_drop("model.dtype"), "field model.dtype is missing"),
    (_set("network.rank", True), "field network.rank must be an integer"),
    (_drop("tensors_sha256"), "field tensors_sha256 is missing"),
    (_set("data", None), "field data must be an object"),
])
def test_a_malformed_archive_config_names_the_file_and_the_field(edit, field: str, tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps(_config()))
    assert read_config(tmp_path)["targets"][2]["layer"] == 1  # the untouched config is fine
    broken = _config()
    edit(broken)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(broken))
    with pytest.raises(MendArchiveError) as err:
        read_config(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(err.value) and field in str(err.value)


def test_non_finite_statistics_never_reach_the_weights(micro, tmp_path: Path) -> None:
    model, tokenizer, family = micro.model, micro.tokenizer, micro.family
    hp = MendHparams(**MICRO)
    targets = edit_targets(model, family, hp.layers, hp.modules)
    untrained = MendNetwork(targets, rank=hp.rank, n_hidden=hp.n_hidden, edit_lr=hp.edit_lr)  # statistics NaN
    whole = model_digest(model)
    with pytest.raises(ValueError, match="u_mean is not finite"):
        MendEditor(hp, network=untrained).apply(model, tokenizer, family, [REQUEST])
    assert model_digest(model) == whole

    network = _random_network(micro, hp)
    with torch.no_grad():
        next(iter(network.nets.values())).delta_std[0] = float("inf")
    save_archive(tmp_path, network, identity=micro.identity, model=model, family=family, hparams=hp,
                 data={"sha256": "d"}, training={})
    with pytest.raises(MendArchiveError, match=r"delta_std holds non-finite values"):
        load_archive(tmp_path, model, family, hp, identity=micro.identity)


@pytest.mark.parametrize("name", ["lr", "grad_clip"])
def test_training_rates_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"MendHparams.{name}: expected a finite number > 0, got 0"):
        MendHparams(**{**MICRO, name: 0.0})


# ---------------------------------------------------------------------------------------------- training


def test_training_is_deterministic_and_moves_the_network(micro) -> None:
    from editors.mend_train import train_mend

    hp = MendHparams(**MICRO)
    cases, _ = _micro_cases(micro)
    first, report = train_mend(micro.model, micro.tokenizer, micro.family, hp, cases, progress=False)
    second, _ = train_mend(micro.model, micro.tokenizer, micro.family, hp, cases, progress=False)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(tensor_digest(a[k]) == tensor_digest(b[k]) for k in a)
    # trained: U left its zero start, step sizes moved, statistics were taken
    assert any(float(a[k].abs().max()) > 0 for k in a if re.search(r"\.u\d$", k))
    assert report["edit_lrs"] != [hp.edit_lr] * len(report["edit_lrs"])
    assert all(bool(torch.isfinite(a[k]).all()) for k in a)
    assert report["nll_after_edit_last"] < report["nll_before_edit"]


def test_organism_training_edits_are_disjoint_from_the_certification_sets() -> None:
    from pytest_editsafety.zoo.mend_data import certified_pairs, mend_training_cases
    from pytest_editsafety.zoo.world import LEAD_INS, RELATIONS, World, WorldSpec, render_fact

    spec = WorldSpec()
    held_out = certified_pairs(spec)
    assert len(held_out) == spec.n_single_subjects  # hard and normal edit the same pairs
    cases = mend_training_cases(spec, 1000, seed=42)

    def relation_of(request: EditRequest) -> str:
        (name,) = [r.name for r in RELATIONS if any(request.prompt.endswith(t.format(s="{}")) for t in r.templates)]
        return name

    pairs = {(c.edit.subject, relation_of(c.edit)) for c in cases}
    assert not pairs & held_out
    # the locality facts state no certified (subject, relation) fact either
    world = World(spec)
    fact_texts = {render_fact(subject, template, world.object_of(subject, r.name), lead): (subject, r.name)
                  for subject in world.subjects for r in RELATIONS for template in r.templates
                  for lead in ("",) + LEAD_INS}
    locality = [fact_texts[c.locality[0]] for c in cases]
    assert not set(locality) & held_out
    assert {relation for _, relation in locality} == {r.name for r in RELATIONS}
    assert len(pairs) > 700  # the training pairs are covered (816 of them), not a few repeated
    assert all(c.equivalent.prompt != c.edit.prompt and c.equivalent.subject == c.edit.subject for c in cases)
    assert all(c.edit.subject not in c.locality[0] for c in cases)
    first = sum(c.edit.prompt.startswith("{}") for c in cases) / len(cases)
    assert 0.05 < first < 0.3  # both shapes: subject first (hard) and behind a lead-in (normal)
    assert mend_training_cases(spec, 50, seed=42) == cases[:50]


# ---------------------------------------------------------------------------------------------- CLI


def test_train_command_trains_once_and_the_editor_finds_the_network(micro_model: Path, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:
    from editors.registry import build_editor
    from pytest_editsafety.cli import main
    from pytest_editsafety.organisms import hparams_keys
    from pytest_editsafety.registry import load_model
    from pytest_editsafety.resources import ModelResources

    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    user = tmp_path / "micro-mend.json"
    user.write_text(json.dumps({**MICRO, "layers": list(MICRO["layers"]), "modules": list(MICRO["modules"])}))
    args = ["train", "--editor", "mend", "--model", str(micro_model), "--hparams", str(user), "--json", "--quiet"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["trained"] and first["editor"] == "mend" and first["data"]["source"] == "organism world"
    assert first["data"]["world"]["n_single_subjects"] == 6  # the micro organism's own world, from its metadata
    assert Path(first["network"]).parent == tmp_path / "cache" / "mend"
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["trained"] is False

    # the harness's provider finds the network the command trained (same model, hparams and dtype)
    loaded = load_model(str(micro_model))
    editor = build_editor("mend", hparams_keys(loaded), loaded.model, user_hparams=user)
    resources = ModelResources(loaded, cache_root=tmp_path / "cache", stats_corpus=None, stats_cache=None)
    provided = set_up(editor, loaded.model, loaded.tokenizer, loaded.family, resources)
    assert provided.trained_network == Path(first["network"]) == editor.archive_path

    assert main(["train", "--editor", "mend", "--model", str(micro_model), "--cases",
                 str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err
    # an editor that needs no trained network has nothing to train
    assert main(["train", "--editor", "rome", "--model", str(micro_model), "--quiet"]) == 2
    assert "editor 'rome' needs no trained network" in capsys.readouterr().err


def test_train_refuses_a_real_model_without_cases_before_loading_it(monkeypatch, capsys) -> None:
    from pytest_editsafety import registry
    from pytest_editsafety.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a command that cannot run")

    monkeypatch.setattr(registry, "load_model", no_loading)
    assert main(["train", "--editor", "mend", "--model", "gpt2-xl"]) == 2
    assert "'gpt2-xl' is not a model organism: give the training edits with --cases FILE" in capsys.readouterr().err


def test_training_cases_from_a_case_set_pair_each_edit_with_a_paraphrase_and_locality() -> None:
    from pytest_editsafety.cases import resolve_cases
    from pytest_editsafety.trained import N_LOCALITY, cases_from_case_set

    case_set = resolve_cases("normal")
    cases = cases_from_case_set(case_set, seed=3)
    assert len(cases) == len(case_set.cases) and cases == cases_from_case_set(case_set, seed=3)
    for case, training in zip(case_set.cases, cases):
        assert training.edit == EditRequest(case.subject, case.prompt, case.target_new)
        if case.paraphrase_prompts:  # a paraphrase is a whole text with no separate subject
            assert training.equivalent == EditRequest(case.paraphrase_prompts[0], "{}", case.target_new)
        else:
            assert training.equivalent == training.edit
        assert len(training.locality) == N_LOCALITY
    with pytest.raises(ValueError, match="at least 2 cases"):
        cases_from_case_set(case_set.with_cases(case_set.cases[:1]))
