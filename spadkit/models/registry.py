"""Model registry (timm-style names) and the pretrained configuration saved beside weights.

``create_model("spad_vit_small")`` builds a registered variant;
``create_model(name, pretrained=DIR)`` also loads ``DIR/model.pt`` (a plain
state dict read with ``torch.load(weights_only=True)``, so a checkpoint cannot
run code) after checking ``DIR/pretrained_cfg.json`` names the same architecture.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import json
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spadkit.atomic import atomic_path
from spadkit.errors import CorruptFileError, SpadkitError
from spadkit.models.eva import SpadEva
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
        """Parse and type-check a ``pretrained_cfg.json`` (unknown keys are ignored).

        Raises:
            CorruptFileError: not JSON, not an object, a missing architecture, or a field of the
                wrong type or range (``in_chans`` must be within :data:`SIZE_LIMITS`); names ``source``.
        """
        fix = "re-export the weights with save_pretrained (pretrained_cfg.json is written beside model.pt)."
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as error:  # ValueError: a huge integer literal
            raise CorruptFileError(f"not a valid pretrained config ({type(error).__name__}: {str(error)[:200]})", path=source, fix=fix) from None
        if not isinstance(data, dict):
            raise CorruptFileError(f"not a valid pretrained config (a JSON {type(data).__name__}, not an object)", path=source, fix=fix)
        hints = typing.get_type_hints(cls)
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if "architecture" not in values:
            raise CorruptFileError("not a valid pretrained config (no 'architecture')", path=source, fix=fix)
        for name, value in values.items():
            hint = hints[name]
            if not _matches(value, hint):
                raise CorruptFileError(f"pretrained config field {name!r} must be {_type_name(hint)}, not {type(value).__name__} {_short(value)}", path=source, fix=fix)
            low, high = _CFG_RANGES.get(name, (None, None))
            if low is not None and not low <= value <= high:
                raise CorruptFileError(f"pretrained config field {name!r} = {_short(value)} is outside {low}..{high}", path=source, fix=fix)
        return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (``int`` excludes ``bool``; JSON arrays fit lists and tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin in (list, tuple):
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is None or hint is type(None):
        return value is None
    return isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


#: Ranges (inclusive) of the size arguments :func:`create_model` accepts; ``channels`` applies to each entry.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "in_chans": (1, 64),
    "embed_dim": (1, 8192),
    "depth": (1, 128),
    "num_heads": (1, 128),
    "num_codes": (2, 1 << 20),
    "num_classes": (0, 1 << 16),  # 0: a classifier returning pooled features
    "channels": (1, 8192),
}
_CFG_RANGES = {"in_chans": SIZE_LIMITS["in_chans"], "patch_size": (1, 1024)}
#: Environment variable capping the parameter count of a model built by :func:`create_model`.
MAX_PARAMS_ENV = "SPADKIT_MAX_MODEL_PARAMS"
#: Default cap: 1e9 parameters (4 GB of float32 weights; ViT-B is 8.9e7).
DEFAULT_MAX_PARAMS = 1_000_000_000


def max_model_params() -> int:
    """The parameter cap: ``$SPADKIT_MAX_MODEL_PARAMS`` (an integer) or :data:`DEFAULT_MAX_PARAMS`."""
    raw = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PARAMS
    if not raw.isdigit() or int(raw) < 1:
        raise SpadkitError(f"{MAX_PARAMS_ENV}={raw!r} is not a positive integer", fix=f"set {MAX_PARAMS_ENV} to a parameter count, e.g. 2000000000, or unset it.")
    return int(raw)


def check_model_args(name: str, kwargs: dict[str, Any]) -> None:
    """Type- and range-check the size arguments of ``create_model(name, **kwargs)`` (see :data:`SIZE_LIMITS`).

    Raises:
        SpadkitError: an argument is not an int (or a sequence of ints for ``channels``) within its range.
    """
    for key, value in kwargs.items():
        if key not in SIZE_LIMITS:
            continue
        low, high = SIZE_LIMITS[key]
        items = list(value) if key == "channels" and isinstance(value, (list, tuple)) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high for v in items):
            raise SpadkitError(
                f"{name}: {key}={_short(value)} is not {'a list of integers' if key == 'channels' else 'an integer'} in {low}..{high}",
                fix=f"pass {key} within {low}..{high} (spadkit.models.registry.SIZE_LIMITS).",
            )


def create_model(name: str, pretrained: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, optionally loading weights saved by :func:`save_pretrained`.

    The arguments are checked first (:func:`check_model_args`), then the model is
    built on the ``meta`` device to count its parameters and buffers, so a config asking for
    an absurd size fails before any memory is allocated.

    Raises:
        SpadkitError: unknown name, arguments out of range, unknown or not fitting together,
            more parameters than :func:`max_model_params`, or weights for another architecture.
        CorruptFileError: the saved weights do not fit the model.
    """
    if name not in _REGISTRY:
        raise SpadkitError(f"unknown model {name!r}", fix=f"registered models: {', '.join(list_models())}.")
    if pretrained is not None:
        kwargs = {**saved_model_args(name, pretrained), **kwargs}
    check_model_args(name, kwargs)
    try:
        with torch.device("meta"):
            skeleton = _REGISTRY[name](**kwargs)
        count = sum(t.numel() for t in (*skeleton.parameters(), *skeleton.buffers()))
    except SpadkitError:
        raise
    except (TypeError, ValueError) as error:  # an unknown keyword, or sizes that do not fit together
        raise SpadkitError(f"{name}: {error}", fix=f"see help(spadkit.models.registry.{name}) for the arguments.") from None
    if count > max_model_params():
        raise SpadkitError(
            f"{name} with {kwargs} would have {count:.3g} parameters and buffer values, more than the limit {max_model_params():.3g}",
            fix=f"use smaller size arguments, or raise the limit with {MAX_PARAMS_ENV}=N.",
        )
    model = _REGISTRY[name](**kwargs)
    if torch.get_default_device().type == "meta":  # a size-check skeleton (an outer create_model): no weights to read
        return model
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


def saved_model_args(name: str, directory: str | os.PathLike) -> dict[str, Any]:
    """The constructor arguments a ``save_pretrained`` folder implies for ``name``: its ``in_chans``, and the
    ``num_classes`` a fine-tune recorded in ``provenance``, for the architectures that take them."""
    cfg_file = Path(directory) / CFG_FILE
    if not cfg_file.is_file():
        raise SpadkitError("missing pretrained file", path=cfg_file, fix="point at a folder written by spadkit.models.save_pretrained.")
    cfg = PretrainedCfg.from_json(cfg_file.read_text(), cfg_file)
    accepted = inspect.signature(_REGISTRY[name]).parameters
    saved = {"in_chans": cfg.in_chans, "num_classes": cfg.provenance.get("num_classes")}
    return {key: value for key, value in saved.items() if value is not None and key in accepted}


def save_pretrained(model: nn.Module, cfg: PretrainedCfg, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.pt`` (state dict) and ``pretrained_cfg.json`` atomically into ``directory``.

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (e.g. the full weights
    gathered from a sharded FSDP run, see :func:`spadkit.tasks.pretrain.full_submodule_state`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
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


def load_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Args:
        path: a file written by ``torch.save`` (a state dict or a Lightning checkpoint).
        mmap: memory-map the tensors instead of reading them (cheap validity check of a large file).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # pickle.UnpicklingError for hostile files, RuntimeError/EOFError for truncated ones
        raise checkpoint_error(path, error) from error


def checkpoint_error(path: str | os.PathLike | None, error: BaseException) -> CorruptFileError:
    """The error for a checkpoint ``torch.load(weights_only=True)`` refused: names the file and, for pickled code, the global."""
    text = " ".join(str(error).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    reason = f"it holds pickled code ({found.group(1)}), not only tensors" if found else f"{type(error).__name__}: {text[:300]}"
    return CorruptFileError(
        f"refused to load the checkpoint: {reason}",
        path=path,
        fix="only load checkpoints you trust; spadkit reads tensors only (weights_only=True). A truncated file must be written again.",
    )


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
def spad_eva_test(**kwargs: Any) -> SpadEva:
    """Tiny EVA-02-style SPAD-ViT for tests: 64 dims, 2 blocks, 2 heads."""
    return SpadEva(**{"embed_dim": 64, "depth": 2, "num_heads": 2, "pos_grid": (4, 4, 4), **kwargs})


@register_model
def spad_eva_base(**kwargs: Any) -> SpadEva:
    """PUMIT-B: EVA-02-style ViT-B/16 (SwiGLU 2048, sub-LN, q/v bias), position grid (5, 10, 10) as PUMIT's MIM."""
    return SpadEva(**{"embed_dim": 768, "depth": 12, "num_heads": 12, "pos_grid": (5, 10, 10), **kwargs})


@register_model
def spad_vt_test(**kwargs: Any) -> SpadVT:
    """Tiny tokenizer for tests: channels 8/16/32, 64 codes."""
    return SpadVT(**{"channels": (8, 16, 32), "num_codes": 64, **kwargs})


@register_model
def spad_vt(**kwargs: Any) -> SpadVT:
    """PUMIT-sized tokenizer: channels 128/256/512, 1024 codes of dimension 512."""
    return SpadVT(**{"channels": (128, 256, 512), "num_codes": 1024, **kwargs})
