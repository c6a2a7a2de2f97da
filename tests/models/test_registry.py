"""Registry contract over every registered variant, and safe checkpoint I/O."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from spadkit.errors import CorruptFileError, SpadkitError
from spadkit.models import (
    PretrainedCfg,
    SpadViT,
    SpadVT,
    batch_level,
    create_model,
    list_models,
    load_pretrained,
    load_state_dict,
    save_pretrained,
    token_grid,
)
from spadkit.models.classifier import SpadClassifier
from spadkit.models.registry import CFG_FILE, WEIGHTS_FILE
from spadkit.models.unetr import SpadUNETR
from spadkit.models.unimed import UniMedNet
from tests.conftest import HostilePickle

# the three spacing kinds, on one set of weights: (shape (Z, Y, X), spacing (Z, Y, X) mm)
VIT_INPUTS = {"iso": ((32, 32, 32), (1.0, 1.0, 1.0)), "aniso": ((8, 32, 32), (3.0, 0.75, 0.75)), "2d": ((1, 32, 32), (1.0, 1.0, 1.0))}
VT_INPUTS = {"iso": ((16, 32, 32), (1.0, 1.0, 1.0)), "aniso": ((8, 32, 32), (3.0, 0.75, 0.75)), "2d": ((1, 32, 32), (1.0, 1.0, 1.0))}
_CACHE: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    """Each variant is built once per session (the base sizes take seconds to initialise)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_model(name)
    return _CACHE[name]


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _CACHE.clear()


def test_registered_variants():
    names = list_models()
    assert {"spad_vit_test", "spad_vit_small", "spad_vit_base", "spad_vt_test", "spad_vt"} <= set(names)
    assert names == sorted(names)
    assert list_models("spad_vit_*") == ["spad_vit_base", "spad_vit_small", "spad_vit_test"]
    assert list_models("nothing*") == []


def test_unknown_model_lists_names():
    with pytest.raises(SpadkitError, match="unknown model 'spad_vit_huge'") as info:
        create_model("spad_vit_huge")
    for name in list_models():
        assert name in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_all_spacing_kinds(name):
    model = _model(name).train()
    assert model.pretrained_cfg.architecture == name
    inputs = VT_INPUTS if isinstance(model, SpadVT) else VIT_INPUTS
    assert isinstance(model, (SpadViT, SpadVT, SpadClassifier, SpadUNETR, UniMedNet)), f"add {type(model).__name__} to the contract test"
    first_weight = next(model.parameters())
    for shape, spacing in inputs.values():
        model.zero_grad(set_to_none=True)
        x = torch.rand(2, 1, *shape)
        level = batch_level(spacing, shape[0])
        grid = token_grid(shape, level)
        if isinstance(model, SpadViT):
            out = model.forward_features(x, torch.tensor([spacing] * 2))
            assert out.shape == (2, 1 + grid[0] * grid[1] * grid[2], model.embed_dim)
            assert model(x, spacing).shape == (2, model.num_features)
            loss = out.square().mean()
        elif isinstance(model, (SpadClassifier, SpadUNETR)):  # task models: logits per image / per voxel
            out = model(x, torch.tensor([spacing] * 2))
            assert out.shape == ((2, model.num_classes) if isinstance(model, SpadClassifier) else (2, model.num_classes, *shape))
            loss = out.square().mean()
        elif isinstance(model, UniMedNet):  # per class query: presence logits, mask logits on the input grid
            out = model(x, torch.tensor([spacing] * 2))
            queries = out.presence.shape[1]
            assert queries >= model.num_classes and out.masks.shape == (2, queries, *shape)
            loss = out.masks.square().mean() + out.presence.square().mean()
        else:
            recon, logits = model(x, torch.tensor([spacing] * 2))
            assert recon.shape == x.shape
            assert logits.shape == (2, model.num_codes, *grid)
            loss = (recon - x).abs().mean() + logits.square().mean()
        assert torch.isfinite(loss)
        loss.backward()
        grad = first_weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, shape)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list_models("spad_vit_*"))
def test_vit_intermediates_and_mask(name):
    model = _model(name).eval()
    depth = len(model.blocks)
    assert len(model.feature_info) == depth
    indices = [0, depth // 2, depth - 1]
    with torch.no_grad():
        for shape, spacing in VIT_INPUTS.values():
            x = torch.rand(1, 1, *shape)
            maps = model.forward_intermediates(x, spacing, indices)
            assert len(maps) == len(indices)
            depth_reduction = shape[0] // token_grid(shape, batch_level(spacing, shape[0]))[0]
            assert depth_reduction == {0: 16, 2: 4, 5: 1}[batch_level(spacing, shape[0])]
            for i, fmap in zip(indices, maps):
                info = model.feature_info[i]
                assert fmap.shape == (1, info["num_chs"], shape[0] // depth_reduction, shape[1] // info["reduction"], shape[2] // info["reduction"])
            # masking touches only the masked tokens of the embedding
            tokens, grid = model.embed(x, spacing)
            mask = torch.zeros(1, grid[0] * grid[1] * grid[2], dtype=torch.bool)
            mask[0, 0] = True
            masked, _ = model.embed(x, spacing, mask)
            changed = (masked != tokens).any(-1)[0]
            assert changed.tolist() == [False, True] + [False] * (mask.shape[1] - 1)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["spad_vit_test", "spad_vt_test"])
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = PretrainedCfg(architecture=name, modalities=["CT", "MR"], license="CC-BY-4.0", provenance={"objective": "test", "steps": 3})
    assert save_pretrained(model, cfg, tmp_path / "w") == tmp_path / "w"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted([WEIGHTS_FILE, CFG_FILE])  # no temp files left
    torch.manual_seed(1)
    loaded = create_model(name, pretrained=tmp_path / "w").eval()
    assert loaded.pretrained_cfg == cfg
    state, cfg2 = load_pretrained(tmp_path / "w")
    assert cfg2 == cfg and state.keys() == model.state_dict().keys()
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        if isinstance(model, SpadViT):
            torch.testing.assert_close(loaded.forward_features(x, (1, 1, 1)), model.forward_features(x, (1, 1, 1)), rtol=0, atol=0)
        else:
            for a, b in zip(loaded(x, (1, 1, 1)), model(x, (1, 1, 1))):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pretrained_cfg_json():
    cfg = PretrainedCfg(architecture="spad_vit_test", modalities=["CT"])
    assert PretrainedCfg.from_json(cfg.to_json()) == cfg
    data = json.loads(cfg.to_json())
    assert "16 >> floor(log2(clip(z / min(y, x), 1, 32)))" in data["spacing_rule"]
    assert PretrainedCfg.from_json(json.dumps({**data, "future_field": 1})) == cfg  # unknown keys ignored
    for bad in ["{not json", "[1, 2]", "{}", '"text"']:
        with pytest.raises(CorruptFileError, match="pretrained config"):
            PretrainedCfg.from_json(bad, "cfg.json")


@pytest.fixture
def saved_vit(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_pretrained(create_model("spad_vit_test"), PretrainedCfg(architecture="spad_vit_test"), tmp_path / "vit")


def test_wrong_architecture_raises(saved_vit):
    with pytest.raises(SpadkitError, match="for 'spad_vit_test', not 'spad_vit_small'") as info:
        create_model("spad_vit_small", pretrained=saved_vit)
    assert str(saved_vit) in str(info.value)


def test_weights_not_fitting_their_config_raise(saved_vit, tmp_path):
    torch.manual_seed(0)
    lying = save_pretrained(create_model("spad_vt_test"), PretrainedCfg(architecture="spad_vit_test"), tmp_path / "lying")
    with pytest.raises(CorruptFileError, match="do not fit 'spad_vit_test'") as info:
        create_model("spad_vit_test", pretrained=lying)
    assert str(lying / WEIGHTS_FILE) in str(info.value)
    torch.save(torch.zeros(3), saved_vit / WEIGHTS_FILE)  # a tensor, not a state dict
    with pytest.raises(CorruptFileError, match="do not fit"):
        create_model("spad_vit_test", pretrained=saved_vit)
    # kwargs that change the architecture are caught the same way
    save_pretrained(create_model("spad_vit_test"), PretrainedCfg(architecture="spad_vit_test"), saved_vit)
    with pytest.raises(CorruptFileError, match="do not fit"):
        create_model("spad_vit_test", pretrained=saved_vit, in_chans=2)


def test_missing_files_raise(saved_vit, tmp_path):
    with pytest.raises(SpadkitError, match="missing pretrained file"):
        load_pretrained(tmp_path / "nowhere")
    (saved_vit / CFG_FILE).unlink()
    with pytest.raises(SpadkitError, match="missing pretrained file") as info:
        create_model("spad_vit_test", pretrained=saved_vit)
    assert CFG_FILE in str(info.value)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_hostile_pickle_rejected(saved_vit, tmp_path, writer):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(HostilePickle(proof)))  # the payload really runs code when unpickled unsafely
    assert proof.exists()
    marker = tmp_path / "pwned"
    weights = saved_vit / WEIGHTS_FILE
    payload = {"patch_embed.weight": HostilePickle(marker)}
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, weights)
    before = _snapshot(saved_vit)
    for load in (lambda: create_model("spad_vit_test", pretrained=saved_vit), lambda: load_pretrained(saved_vit), lambda: load_state_dict(weights)):
        with pytest.raises(CorruptFileError, match="refused to load") as info:
            load()
        assert str(weights) in str(info.value)
        assert "weights_only=True" in str(info.value)
    assert not marker.exists()
    assert _snapshot(saved_vit) == before  # nothing changed on disk


def test_truncated_weights_rejected(saved_vit):
    weights = saved_vit / WEIGHTS_FILE
    data = weights.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        weights.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError) as info:
            create_model("spad_vit_test", pretrained=saved_vit)
        assert str(weights) in str(info.value)
        assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("in_chans", 3000000, "outside 1..64"),  # the 100-byte file that grew 5.7 GiB
        ("in_chans", "3", "must be int, not str"),
        ("in_chans", True, "must be int, not bool"),
        ("patch_size", 0, "outside 1..1024"),
        ("architecture", 5, "must be str, not int"),
        ("modalities", ["CT", 1], r"must be list\[str\]"),
        ("provenance", [], "must be dict"),
    ],
)
def test_wrong_typed_pretrained_cfg_names_the_file(saved_vit, field, value, message):
    cfg_file = saved_vit / CFG_FILE
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), field: value}))
    with pytest.raises(CorruptFileError, match=message) as info:
        load_pretrained(saved_vit)
    assert str(cfg_file) in str(info.value) and "Fix:" in str(info.value)


def test_pretrained_cfg_with_huge_integer_or_deep_nesting_is_refused(tmp_path):
    for text in ['{"architecture": "spad_vit_test", "in_chans": ' + "9" * 5000 + "}", "[" * 100000 + "]" * 100000]:
        with pytest.raises(CorruptFileError, match="not a valid pretrained config"):
            PretrainedCfg.from_json(text, tmp_path / CFG_FILE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_chans": 3000000}, r"in_chans=3000000 is not an integer in 1\.\.64"),
        ({"in_chans": "1"}, "in_chans='1' is not an integer"),
        ({"embed_dim": 2.5}, "embed_dim=2.5"),
        ({"embed_dim": 8192, "depth": 128, "num_heads": 128}, "parameters and buffer values, more than the limit"),
        ({"no_such_arg": 1}, "unexpected keyword argument 'no_such_arg'"),
        ({"embed_dim": 63}, "spad_vit_test: dim 63 must split into 2 heads"),
    ],
)
def test_create_model_checks_sizes_before_allocating(kwargs, message):
    with pytest.raises(SpadkitError, match=message):
        create_model("spad_vit_test", **kwargs)


def test_parameter_cap_is_configurable(monkeypatch):
    monkeypatch.setenv("SPADKIT_MAX_MODEL_PARAMS", "1000")
    with pytest.raises(SpadkitError, match="SPADKIT_MAX_MODEL_PARAMS"):
        create_model("spad_vt_test")
    monkeypatch.setenv("SPADKIT_MAX_MODEL_PARAMS", "lots")
    with pytest.raises(SpadkitError, match="not a positive integer"):
        create_model("spad_vt_test")
    monkeypatch.setenv("SPADKIT_MAX_MODEL_PARAMS", "200000")
    assert sum(p.numel() for p in create_model("spad_vt_test").parameters()) <= 200000
