"""spadkit: spacing-adaptive medical-image foundation models with a human in the loop."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spadkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from spadkit.volume import LabelVolume, Volume

__all__ = ["LabelVolume", "Volume", "__version__"]
