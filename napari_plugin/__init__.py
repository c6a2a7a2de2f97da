"""spadkit's napari plugin (npe2): open images and stores at physical scale, save label versions.

The contributions live in ``napari.yaml``: a reader (:mod:`spadkit_napari._reader`),
a labels writer (:mod:`spadkit_napari._writer`) and sample data
(:mod:`spadkit_napari._sample_data`). napari imports those modules only when a
contribution is used, so importing this package stays cheap.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spadkit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "unknown"

__all__ = ["__version__"]
