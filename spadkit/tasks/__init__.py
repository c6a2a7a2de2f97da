"""LightningModules: tokenizer training, SPAD-ViT pretraining, segmentation/classification fine-tuning.

Names are imported on first use, so ``import spadkit.tasks`` costs nothing
until a task class is asked for (and never loads the zarr/dask data stack).
"""

from typing import TYPE_CHECKING

from spadkit._lazy import lazy_exports

if TYPE_CHECKING:
    from spadkit.tasks.finetune import ClsFinetune, SegFinetune
    from spadkit.tasks.mae import MAEPretrain
    from spadkit.tasks.pretrain import MIMPretrain, adamw_with_cosine
    from spadkit.tasks.tokenizer import TokenizerPretrain
    from spadkit.tasks.unimed import UniMedPretrain

_EXPORTS = {"ClsFinetune": "spadkit.tasks.finetune", "MAEPretrain": "spadkit.tasks.mae", "SegFinetune": "spadkit.tasks.finetune", "MIMPretrain": "spadkit.tasks.pretrain", "adamw_with_cosine": "spadkit.tasks.pretrain", "TokenizerPretrain": "spadkit.tasks.tokenizer", "UniMedPretrain": "spadkit.tasks.unimed"}
__all__ = ["ClsFinetune", "MAEPretrain", "MIMPretrain", "SegFinetune", "TokenizerPretrain", "UniMedPretrain", "adamw_with_cosine"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
