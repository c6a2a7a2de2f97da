"""From OME-Zarr stores to training batches: samplers, the patch stream, augmentation, DataModule.

``PatchDataModule`` is imported on first use: Lightning adds ~170 MB to a
process that only streams patches.
"""

from typing import Any

from spadkit.data.augment import BatchAugment
from spadkit.data.cache import ChunkCache
from spadkit.data.patches import LabelSampler, PatchSize, UniformSampler, grid_windows
from spadkit.data.sources import CaseInfo, DatasetSource, dataset_probabilities, index_source
from spadkit.data.stream import PatchStream, StreamLoader, distributed_rank

__all__ = [
    "BatchAugment",
    "CaseInfo",
    "ChunkCache",
    "DatasetSource",
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


def __getattr__(name: str) -> Any:
    if name == "PatchDataModule":
        from spadkit.data.datamodule import PatchDataModule

        return PatchDataModule
    raise AttributeError(f"module 'spadkit.data' has no attribute {name!r}")
