"""spadkit: spacing-adaptive medical-image foundation models with a human in the loop."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spadkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from typing import TYPE_CHECKING

from spadkit._lazy import lazy_exports

if TYPE_CHECKING:
    from spadkit.volume import LabelVolume, Volume

__all__ = ["LabelVolume", "Volume", "__version__"]

# Volume needs nibabel: import it on first use so `import spadkit.models` stays torch + numpy only.
__getattr__, __dir__ = lazy_exports(__name__, {"LabelVolume": "spadkit.volume", "Volume": "spadkit.volume"})
