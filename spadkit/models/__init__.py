"""Spacing-adaptive models (plain ``nn.Module``s): SPAD-ViT, the SPAD-VT tokenizer, heads, registry,
the SPAD-UNETR segmenter, the classifier and UniMed's decoders."""

from spadkit.models.classifier import SpadClassifier
from spadkit.models.eva import SpadEva
from spadkit.models.heads import (
    CodeHead,
    ModalityDiscriminator,
    PixelHead,
    ScaleClassifier,
    reverse_gradient,
    scale_bin,
)
from spadkit.models.pumit_weights import LoadReport, load_pumit_weights
from spadkit.models.registry import (
    PretrainedCfg,
    create_model,
    list_models,
    load_pretrained,
    load_state_dict,
    register_model,
    save_pretrained,
)
from spadkit.models.spad import (
    SpadConv3d,
    SpadConvTranspose3d,
    anisotropy_level,
    batch_level,
    plan_downsampling,
    total_stride,
)
from spadkit.models.tokenizer import PatchDiscriminator, SpadVT
from spadkit.models.unetr import SpadUNETR
from spadkit.models.unimed import UniMedDecoder, UniMedNet, compose_targets
from spadkit.models.vit import SpadViT, patch_shape, token_grid

__all__ = [
    "CodeHead",
    "LoadReport",
    "ModalityDiscriminator",
    "PatchDiscriminator",
    "PixelHead",
    "PretrainedCfg",
    "ScaleClassifier",
    "SpadClassifier",
    "SpadConv3d",
    "SpadConvTranspose3d",
    "SpadEva",
    "SpadUNETR",
    "SpadVT",
    "SpadViT",
    "UniMedDecoder",
    "UniMedNet",
    "anisotropy_level",
    "batch_level",
    "compose_targets",
    "create_model",
    "list_models",
    "load_pretrained",
    "load_pumit_weights",
    "load_state_dict",
    "patch_shape",
    "plan_downsampling",
    "register_model",
    "reverse_gradient",
    "save_pretrained",
    "scale_bin",
    "token_grid",
    "total_stride",
]
