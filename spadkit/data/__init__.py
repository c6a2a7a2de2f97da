"""From OME-Zarr stores to training batches: samplers, the patch stream, augmentation, DataModule.

Every name is imported on first use: ``import spadkit.data`` (or a light
submodule such as :mod:`spadkit.data.augment`) does not load zarr, dask or
Lightning until a class that needs them is asked for.
"""

from typing import TYPE_CHECKING

from spadkit._lazy import lazy_exports

if TYPE_CHECKING:
    from spadkit.data.augment import BatchAugment
    from spadkit.data.cache import ChunkCache
    from spadkit.data.datamodule import PatchDataModule
    from spadkit.data.patches import LabelSampler, PatchSize, UniformSampler, grid_windows
    from spadkit.data.sources import CaseInfo, DatasetSource, dataset_probabilities, index_source
    from spadkit.data.stream import PatchStream, StreamLoader, distributed_rank
    from spadkit.io.annotations import LEVELS, Boxes, ImageClasses

_EXPORTS = {
    "BatchAugment": "spadkit.data.augment",
    "ChunkCache": "spadkit.data.cache",
    "PatchDataModule": "spadkit.data.datamodule",
    **dict.fromkeys(("LabelSampler", "PatchSize", "UniformSampler", "grid_windows"), "spadkit.data.patches"),
    **dict.fromkeys(("CaseInfo", "DatasetSource", "dataset_probabilities", "index_source"), "spadkit.data.sources"),
    **dict.fromkeys(("PatchStream", "StreamLoader", "distributed_rank"), "spadkit.data.stream"),
    **dict.fromkeys(("LEVELS", "Boxes", "ImageClasses"), "spadkit.io.annotations"),
}
__all__ = [
    "LEVELS",
    "BatchAugment",
    "Boxes",
    "CaseInfo",
    "ChunkCache",
    "DatasetSource",
    "ImageClasses",
    "LabelSampler",
    "PatchDataModule",
    "PatchSize",
    "PatchStream",
    "StreamLoader",
    "UniformSampler",
    "dataset_probabilities",
    "distributed_rank",
    "grid_windows",
    "index_source",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
