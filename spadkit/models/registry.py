"""Model registry (timm-style names) and the pretrained configuration saved beside weights.

``create_model("spad_vit_small")`` builds a registered variant;
``create_model(name, pretrained=DIR)`` also loads ``DIR/model.pt`` (a plain
state dict read with ``torch.load(weights_only=True)``, so a checkpoint cannot
run code) after checking ``DIR/pretrained_cfg.json`` names the same architecture.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spadkit.atomic import atomic_path
from spadkit.errors import CorruptFileError, SpadkitError
from spadkit.models.tokenizer import SpadVT
from spadkit.models.vit import SpadViT

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
WEIGHTS_FILE = "model.pt"
CFG_FILE = "pretrained_cfg.json"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a glob pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


@dataclasses.dataclass
class PretrainedCfg:
    """What a user of the weights must know, saved as JSON next to them."""

    architecture: str
    in_chans: int = 1
    spacing_rule: str = "spad: depth patch = max(16 >> floor(log2(clip(z / min(y, x), 1, 32))), 1); 2D images -> 1x16x16"
    patch_size: int = 16
    intensity: str = "percentile: clip to the case's 0.5-99.5 percentiles, scale to [0, 1]; uint8 images / 255"
    orientation: str = "RAS (spadkit stores reorient at ingest)"
    modalities: list[str] = dataclasses.field(default_factory=list)
    license: str = "unspecified"
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike | None = None) -> PretrainedCfg:
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (json.JSONDecodeError, TypeError, AttributeError) as error:  # AttributeError: JSON not an object
            raise CorruptFileError(f"not a valid pretrained config ({error})", path=source, fix="re-export the weights with save_pretrained.") from error


def create_model(name: str, pretrained: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, optionally loading weights saved by :func:`save_pretrained`."""
    if name not in _REGISTRY:
        raise SpadkitError(f"unknown model {name!r}", fix=f"registered models: {', '.join(list_models())}.")
    model = _REGISTRY[name](**kwargs)
    if pretrained is not None:
        state, cfg = load_pretrained(pretrained)
        if cfg.architecture != name:
            raise SpadkitError(f"these weights are for {cfg.architecture!r}, not {name!r}", path=pretrained, fix=f"create_model({cfg.architecture!r}, ...).")
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as error:  # wrong keys/shapes, or not a state dict at all
            raise CorruptFileError(
                f"weights do not fit {name!r} ({' '.join(str(error).split())[:300]})",
                path=Path(pretrained) / WEIGHTS_FILE,
                fix="re-export the weights with save_pretrained from the architecture named in pretrained_cfg.json.",
            ) from error
    model.pretrained_cfg = PretrainedCfg(architecture=name, in_chans=getattr(model, "in_chans", 1)) if pretrained is None else cfg
    return model


def save_pretrained(model: nn.Module, cfg: PretrainedCfg, directory: str | os.PathLike) -> Path:
    """Write ``model.pt`` (state dict) and ``pretrained_cfg.json`` atomically into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    with atomic_path(directory / CFG_FILE) as tmp:
        Path(tmp).write_text(cfg.to_json())
    return directory


def load_pretrained(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PretrainedCfg]:
    """Read weights and config written by :func:`save_pretrained` (tensors only: no pickled code runs)."""
    directory = Path(directory)
    weights, cfg_file = directory / WEIGHTS_FILE, directory / CFG_FILE
    for path in (weights, cfg_file):
        if not path.is_file():
            raise SpadkitError("missing pretrained file", path=path, fix="point at a folder written by spadkit.models.save_pretrained.")
    cfg = PretrainedCfg.from_json(cfg_file.read_text(), cfg_file)
    return load_state_dict(weights), cfg


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for hostile files, RuntimeError/EOFError for truncated ones
        raise CorruptFileError(
            f"refused to load: not a plain tensor checkpoint ({type(error).__name__}: {' '.join(str(error).split())[:300]})",
            path=path,
            fix="only load checkpoints you trust; spadkit reads tensors only (weights_only=True).",
        ) from error


# ---------------------------------------------------------------------- variants
@register_model
def spad_vit_test(**kwargs: Any) -> SpadViT:
    """Tiny ViT for tests: 64 dims, 2 blocks, 2 heads."""
    return SpadViT(**{"embed_dim": 64, "depth": 2, "num_heads": 2, "pos_grid": (4, 4, 4), **kwargs})


@register_model
def spad_vit_small(**kwargs: Any) -> SpadViT:
    """ViT-S/16: 384 dims, 12 blocks, 6 heads."""
    return SpadViT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


@register_model
def spad_vit_base(**kwargs: Any) -> SpadViT:
    """ViT-B/16: 768 dims, 12 blocks, 12 heads."""
    return SpadViT(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


@register_model
def spad_vt_test(**kwargs: Any) -> SpadVT:
    """Tiny tokenizer for tests: channels 8/16/32, 64 codes."""
    return SpadVT(**{"channels": (8, 16, 32), "num_codes": 64, **kwargs})


@register_model
def spad_vt(**kwargs: Any) -> SpadVT:
    """PUMIT-sized tokenizer: channels 128/256/512, 1024 codes of dimension 512."""
    return SpadVT(**{"channels": (128, 256, 512), "num_codes": 1024, **kwargs})
