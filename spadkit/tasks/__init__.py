"""LightningModules: tokenizer training and SPAD-ViT pretraining."""

from spadkit.tasks.pretrain import MIMPretrain, adamw_with_cosine
from spadkit.tasks.tokenizer import TokenizerPretrain

__all__ = ["MIMPretrain", "TokenizerPretrain", "adamw_with_cosine"]
