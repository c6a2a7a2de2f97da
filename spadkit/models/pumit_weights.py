"""PUMIT's released checkpoints and EVA-02's 2D ViT weights on :class:`~spadkit.models.eva.SpadEva` (no timm).

``load_pumit_weights(model, "pumit-b.ckpt")`` reads a checkpoint (tensors only,
``weights_only=True``), unwraps it (``state_dict``, ``module`` or ``model``
entries; ``module.``/``model.``/``_orig_mod.`` prefixes, as timm's
``clean_state_dict``) and maps it onto the model as PUMIT's
``ViT._load_from_state_dict`` and ``InflatableInputConv3d`` do:

* ``patch_embed.proj.*`` becomes ``patch_embed.*``. A 2D kernel ``(O, I, h, w)``
  (EVA-02, 14x14) is resized bicubically to 16x16 and inflated to 3D by
  repeating it over the 16 depth taps divided by 16, so a constant-in-depth
  input gives the 2D response. A 3D kernel deeper than the model's is summed
  in contiguous depth groups. Input channels that differ are summed and
  divided by the model's channel count (RGB weights on grey input).
* ``input_norm="imagenet"`` (default for RGB checkpoints) folds the ImageNet
  mean/std normalisation PUMIT applies before its ViT into the patch embedding
  (``W / std``, bias ``- sum(W * mean / std)``; exact, the patchify has no
  padding), so the model takes spadkit's grey [0, 1] input and reproduces
  PUMIT's forward on that image replicated to RGB.
* A 2D token position embedding ``(1, 1 + h*w, C)`` is repeated over the depth
  of the model's grid; a 3D grid ``(1, C, d, h, w)`` is resampled (area when
  shrinking, trilinear when growing, as PUMIT's ``resample``).
* Dropped: ``rope.*`` tables (recomputed), ``tokenizer.*``, ``mim_head.*``,
  ``lm_head.*``, EVA-02's ``attn.inner_attn_ln.*`` (PUMIT's ViT has none).

Deliberate difference: for 2D position embeddings PUMIT adds ``pos_embed[:, 1]``
(the first *patch* position) to the cls token; spadkit adds ``pos_embed[:, 0]``,
the cls position's own embedding (``cls_pos_index``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from spadkit.errors import CorruptFileError
from spadkit.models.eva import SpadEva
from spadkit.models.registry import load_state_dict
from spadkit.models.vit import resample_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPERS = ("state_dict", "module", "model")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_DROPPED = ("rope.", "tokenizer.", "mim_head.", "lm_head.")


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_pumit_weights` did: keys the model kept at init, keys dropped, conversions."""

    missing: list[str]
    dropped: list[str]
    notes: list[str]


def unwrap_checkpoint(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a Lightning/DeepSpeed/plain checkpoint, prefixes stripped."""
    state = checkpoint
    for key in _WRAPPERS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    out = {}
    for name, value in state.items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if isinstance(value, torch.Tensor):
            out[name] = value
    return out


def inflate_patch_weight(weight: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """PUMIT's rule for a patch-embedding kernel: ``(O, I, h, w)`` or ``(O, I, D, h, w)`` -> ``(O, I, *patch)``."""
    depth = patch[0]
    if weight.ndim == 4:  # 2D ViT (EVA-02): bicubic to the in-plane patch, then spread over depth
        if tuple(weight.shape[2:]) != patch[1:]:
            weight = F.interpolate(weight.float(), patch[1:], mode="bicubic")
        return (weight / depth)[:, :, None].expand(-1, -1, depth, -1, -1).contiguous()
    if weight.shape[2] % depth or tuple(weight.shape[3:]) != patch[1:]:
        raise ValueError(f"a 3D patch kernel {tuple(weight.shape)} does not reduce to the patch {patch}")
    o, i, d, h, w = weight.shape
    return weight.reshape(o, i, depth, d // depth, h, w).sum(dim=3)


def fold_input_norm(weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``(x - mean) / std`` per input channel into a patchify kernel ``(O, I, ...)`` and its bias ``(O,)``."""
    shape = (1, -1) + (1,) * (weight.ndim - 2)
    mean_t, std_t = weight.new_tensor(mean).reshape(shape), weight.new_tensor(std).reshape(shape)
    folded = weight / std_t
    return folded, bias - (folded * mean_t).flatten(1).sum(dim=1)


def match_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """PUMIT's ``InflatableInputConv3d``: other input channel counts are summed, divided by ``in_chans`` and repeated."""
    if weight.shape[1] == in_chans:
        return weight
    summed = weight.sum(dim=1, keepdim=True) / in_chans
    return summed.expand(-1, in_chans, *weight.shape[2:]).contiguous()


def convert_pumit_state_dict(
    state: Mapping[str, torch.Tensor],
    model: SpadEva,
    input_norm: Literal["imagenet"] | None = "imagenet",
    cls_pos_index: int = 0,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a PUMIT/EVA-02 state dict onto ``model``'s keys and shapes (see the module docstring).

    Args:
        state: unwrapped state dict (:func:`unwrap_checkpoint`).
        model: the target; its patch, channels and position grid set the shapes.
        input_norm: ``"imagenet"`` folds PUMIT's ImageNet normalisation into the patch
            embedding (3-channel checkpoints only); ``None`` keeps the weights as they are.
        cls_pos_index: which token of a 2D ``(1, 1 + h*w, C)`` position embedding is
            added to the cls token (PUMIT: 1; the cls token's own: 0).
    """
    out, dropped, notes = {}, [], []
    for key, value in state.items():
        if key.startswith(_DROPPED) or ".inner_attn_ln." in key:
            dropped.append(key)
        else:
            out[key.replace("patch_embed.proj.", "patch_embed.")] = value
    patch = tuple(model.patch_embed.kernel_size)
    if (weight := out.get("patch_embed.weight")) is not None:
        notes.append(f"patch embedding {tuple(weight.shape)} -> {(weight.shape[0], model.in_chans, *patch)}")
        weight = inflate_patch_weight(weight, patch)
        if input_norm == "imagenet" and weight.shape[1] == len(IMAGENET_MEAN):
            bias = out.get("patch_embed.bias", weight.new_zeros(weight.shape[0]))
            weight, out["patch_embed.bias"] = fold_input_norm(weight, bias, IMAGENET_MEAN, IMAGENET_STD)
            notes.append("ImageNet mean/std folded into the patch embedding: the model takes [0, 1] input")
        out["patch_embed.weight"] = match_channels(weight, model.in_chans)
    if (pos := out.get("pos_embed")) is not None:
        grid = tuple(model.pos_embed.shape[2:])
        if pos.ndim == 3:  # (1, 1 + h*w, C) of a 2D ViT
            side = math.isqrt(pos.shape[1] - 1)
            if side * side != pos.shape[1] - 1:
                raise ValueError(f"2D position embedding of {pos.shape[1] - 1} patch tokens is not a square grid")
            if "cls_token" in out:
                out["cls_token"] = out["cls_token"] + pos[:, cls_pos_index][:, None]
            pos = pos[:, 1:].transpose(1, 2).reshape(1, -1, 1, side, side).expand(-1, -1, grid[0], -1, -1)
        out["pos_embed"] = resample_grid(pos.float(), grid)
        notes.append(f"position embedding {tuple(state['pos_embed'].shape)} -> {tuple(out['pos_embed'].shape)}")
    missing = sorted(set(model.state_dict()) - set(out))
    return out, LoadReport(missing, dropped, notes)


def load_pumit_weights(
    model: SpadEva,
    source: str | os.PathLike | Mapping[str, object],
    *,
    strict: bool = True,
    input_norm: Literal["imagenet"] | None = "imagenet",
    cls_pos_index: int = 0,
) -> LoadReport:
    """Load a PUMIT (``pumit-b.ckpt``) or EVA-02 checkpoint into ``model`` in place.

    Args:
        source: a checkpoint file (read with ``weights_only=True``) or an in-memory checkpoint/state dict.
        strict: fail on keys the model lacks or leaves uninitialised (``mask_token`` of a
            fine-tuning checkpoint, for instance); with ``strict=False`` they are reported.
        input_norm, cls_pos_index: see :func:`convert_pumit_state_dict`.

    Raises:
        CorruptFileError: the weights do not fit the model.
    """
    path = None if isinstance(source, Mapping) else Path(source)
    checkpoint = load_state_dict(path) if path is not None else source
    state, report = convert_pumit_state_dict(unwrap_checkpoint(checkpoint), model, input_norm, cls_pos_index)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise CorruptFileError(
            f"PUMIT weights do not fit {type(model).__name__} ({' '.join(str(error).split())[:300]})",
            path=path,
            fix="build the model with the checkpoint's width, depth and heads (spad_eva_base for PUMIT-B), or pass strict=False.",
        ) from error
    report.missing = sorted(result.missing_keys)
    report.dropped += sorted(result.unexpected_keys)
    return report
