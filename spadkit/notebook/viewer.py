"""An ipywidgets slice viewer for a :class:`~spadkit.volume.Volume` and an optional label map.

Display convention (stated once, used by every view):

* The volume is shown in RAS world orientation whatever its storage order
  (:meth:`Volume.canonical` flips/permutes the axes, no resampling).
* **Radiological** (default): the patient's right is on the screen's *left* in
  axial and coronal views, as on a scanner console and in most PACS.
  ``convention="neurological"`` puts the patient's right on the right.
* Axial views have anterior at the top; coronal and sagittal views have
  superior at the top; sagittal views have anterior on the left.
* Pixels are drawn with their physical aspect ratio (row spacing / column
  spacing in mm), so a 1x1x3 mm volume does not look squashed.

The letters at the image edges name the patient direction on that side.

The figure is a matplotlib ``Figure`` (no pyplot, no interactive backend)
rendered to PNG into an ``ipywidgets.Image``; this works in JupyterLab,
VS Code and in headless execution (nbmake) alike.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from spadkit.errors import SpadkitError
from spadkit.volume import LabelVolume, Volume

try:
    import ipywidgets as widgets
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"spadkit.notebook needs ipywidgets and matplotlib ({err}); install them with: pip install 'spadkit[notebooks]'") from err

#: The three views, each named by the world axis it slices through.
AXES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
#: Array axis of the canonical ``(Z, Y, X)`` grid that each view slices (Z = S, Y = A, X = R).
SLICED_AXIS: Mapping[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
#: Patient direction at the (left, right, top, bottom) edges of the screen, per convention and view.
EDGE_LETTERS: Mapping[str, Mapping[str, tuple[str, str, str, str]]] = {
    "radiological": {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")},
    "neurological": {"axial": ("L", "R", "A", "P"), "coronal": ("L", "R", "S", "I"), "sagittal": ("A", "P", "S", "I")},
}
#: Percentiles of the sampled voxels that the automatic window spans.
AUTO_WINDOW_PERCENTILES = (1.0, 99.0)
#: Colours of label values 1, 2, ... (cycled).
LABEL_COLORS = colormaps["tab10"].colors


def _read(array: Any, index: tuple) -> np.ndarray:
    """``array[index]`` as an in-memory NumPy array (NumPy, Dask or Zarr ``array``)."""
    part = array[index]
    return np.asarray(part.compute() if hasattr(part, "compute") else part)


def show_png(figure: Figure, image: widgets.Image, dpi: int = 100) -> None:
    """Render a matplotlib ``figure`` to PNG into ``image``, shown at 1:1 (never stretched)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    image.value = png
    image.width = str(int.from_bytes(png[16:20], "big"))  # the PNG header's width in pixels


def _in_memory_if_small(volume: Volume, max_memory_mb: float) -> Volume:
    """``volume`` read into memory when it is lazy and at most ``max_memory_mb`` MiB decoded, else unchanged."""
    nbytes = np.prod(volume.shape, dtype=np.float64) * volume.dtype.itemsize
    return volume.load() if volume.is_lazy and nbytes <= max_memory_mb * 2**20 else volume


def _sample_window(volume: Volume, channel: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Auto window ``(lo, hi)`` (:data:`AUTO_WINDOW_PERCENTILES`) and ``(min, max)`` of a channel's three middle slices."""
    z, y, x = (s // 2 for s in volume.spatial_shape)
    planes = [_read(volume.array, (channel, z)), _read(volume.array, (channel, slice(None), y)), _read(volume.array, (channel, slice(None), slice(None), x))]
    values = np.concatenate([p.ravel() for p in planes]).astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        values = np.zeros(1)
    lo, hi = (float(v) for v in np.percentile(values, AUTO_WINDOW_PERCENTILES))
    vmin, vmax = float(values.min()), float(values.max())
    return (lo, hi if hi > lo else lo + 1.0), (vmin, vmax if vmax > vmin else vmin + 1.0)


class SliceViewer:
    """Browse a volume slice by slice with window/level and a label overlay.

    Controls (all are public ipywidgets, so code and tests can drive them):
    ``axis_buttons`` (axial / coronal / sagittal), ``slice_slider`` (index
    along the sliced array axis), ``channel_slider`` (only for C > 1),
    ``level_slider`` and ``window_slider`` (display range ``level +- window/2``
    in the image's units, e.g. HU), ``auto_button`` (back to the 1-99
    percentile window), ``opacity_slider`` (label overlay, 0-1). Display the
    viewer by making it the last expression of a cell or with ``display(viewer)``.

    A lazy (Dask/Zarr/NIfTI) volume of at most ``max_memory_mb`` decoded is read
    into memory once, so browsing is fast (a slice of a ``.nii.gz`` would
    otherwise decompress the file again); a larger one stays lazy and only the
    slice on screen is read. The automatic window comes from the three middle
    slices. Sliders update when released (or on each arrow-key step), so a drag
    does not queue up redraws in the kernel.

    Args:
        volume: image ``(C, Z, Y, X)`` in any orientation.
        label: label map on the image's grid (same shape and affine), or None.
        axis: initial view, one of :data:`AXES`.
        convention: ``"radiological"`` (patient right on screen left) or ``"neurological"``.
        opacity: initial label opacity in [0, 1].
        width_in: figure width in inches (the height follows the physical aspect).
        max_memory_mb: largest lazy volume (and label) read into memory up front, in MiB.

    Raises:
        SpadkitError: ``volume`` is not a Volume, or a bad ``axis``/``convention``/``opacity``.
        GeometryMismatchError: ``label`` is not on the image's grid.
    """

    def __init__(
        self,
        volume: Volume,
        label: LabelVolume | None = None,
        *,
        axis: str = "axial",
        convention: str = "radiological",
        opacity: float = 0.4,
        width_in: float = 4.5,
        max_memory_mb: float = 512.0,
    ):
        if not isinstance(volume, Volume):
            raise SpadkitError(f"SliceViewer shows a spadkit Volume, got {type(volume).__name__}", fix="read the file with spadkit.io.read_volume(path) first.")
        if convention not in EDGE_LETTERS:
            raise SpadkitError(f"unknown display convention {convention!r}", fix=f"use one of {sorted(EDGE_LETTERS)}.")
        if not 0.0 <= opacity <= 1.0:
            raise SpadkitError(f"label opacity must be in [0, 1], got {opacity}", fix="pass e.g. opacity=0.4.")
        if label is not None:
            label.check_matches(volume)
        self.volume = _in_memory_if_small(volume.canonical(), max_memory_mb)
        self.label = _in_memory_if_small(label.canonical(), max_memory_mb) if label is not None else None
        self.convention = convention
        self.width_in = float(width_in)
        views = AXES[:1] if volume.is_2d else AXES
        if axis not in views:
            raise SpadkitError(f"unknown or unavailable view {axis!r} for this {'2D' if volume.is_2d else '3D'} volume", fix=f"use one of {list(views)}.")

        self.figure = Figure(figsize=(self.width_in, self.width_in))
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_subplot()
        self.image: Any = None  # matplotlib AxesImage of the grey-value plane
        self.overlay: Any = None  # AxesImage of the RGBA label overlay (None without a label)
        self._hold = 0  # depth of nested held() blocks; redraws wait until 0

        #: per channel: (lo, hi) auto window and (min, max) of the sampled voxels
        self._windows = [_sample_window(self.volume, c) for c in range(self.volume.num_channels)]
        (lo, hi), _ = self._windows[0]
        vmin, vmax = min(w[1][0] for w in self._windows), max(w[1][1] for w in self._windows)
        span = vmax - vmin
        step = span / 500
        self.axis_buttons = widgets.ToggleButtons(options=list(views), value=axis, description="view")
        self.slice_slider = widgets.IntSlider(description="slice", min=0, max=1, continuous_update=False)
        self.channel_slider = widgets.IntSlider(description="channel", min=0, max=self.volume.num_channels - 1, value=0, continuous_update=False) if self.volume.num_channels > 1 else None
        self.level_slider = widgets.FloatSlider(description="level", min=vmin, max=vmax, step=step, value=(lo + hi) / 2, continuous_update=False)
        self.window_slider = widgets.FloatSlider(description="window", min=step, max=span, step=step, value=max(hi - lo, step), continuous_update=False)
        self.auto_button = widgets.Button(description="auto window", tooltip=f"window the {AUTO_WINDOW_PERCENTILES[0]:g}-{AUTO_WINDOW_PERCENTILES[1]:g} percentiles")
        self.opacity_slider = widgets.FloatSlider(description="label", min=0.0, max=1.0, step=0.05, value=opacity, disabled=self.label is None, continuous_update=False)
        self.image_widget = widgets.Image(format="png")
        self._set_slice_range()

        self.axis_buttons.observe(self._on_axis, names="value")
        for control in (self.slice_slider, self.level_slider, self.window_slider, self.opacity_slider):
            control.observe(self._on_change, names="value")
        if self.channel_slider is not None:
            self.channel_slider.observe(self._on_auto, names="value")  # each channel opens with its own auto window
        self.auto_button.on_click(self._on_auto)
        controls = [self.axis_buttons, self.slice_slider, *([self.channel_slider] if self.channel_slider else [])]
        controls += [widgets.HBox([self.level_slider, self.window_slider, self.auto_button]), self.opacity_slider]
        self.widget = widgets.VBox([*controls, self.image_widget])
        self.widget.add_class("spadkit-slice-viewer")
        self.render()

    # ------------------------------------------------------------------ state
    @property
    def axis(self) -> str:
        """The current view (``"axial"``, ``"coronal"`` or ``"sagittal"``)."""
        return self.axis_buttons.value

    @property
    def index(self) -> int:
        """Index of the shown slice along the sliced array axis of the RAS grid."""
        return int(self.slice_slider.value)

    @property
    def channel(self) -> int:
        return int(self.channel_slider.value) if self.channel_slider else 0

    @property
    def display_range(self) -> tuple[float, float]:
        """``(vmin, vmax)`` of the grey-value mapping: ``level -+ window / 2``."""
        level, window = self.level_slider.value, self.window_slider.value
        return (level - window / 2, level + window / 2)

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """``(row, column)`` spacing in mm of the displayed plane."""
        z, y, x = self.volume.spacing
        return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[self.axis]

    @property
    def aspect(self) -> float:
        """Height / width of one displayed pixel (its physical aspect ratio)."""
        row, col = self.pixel_spacing
        return row / col

    @property
    def edge_letters(self) -> tuple[str, str, str, str]:
        """Patient direction at the (left, right, top, bottom) screen edges of the current view."""
        return EDGE_LETTERS[self.convention][self.axis]

    @property
    def slice_position_mm(self) -> float:
        """World coordinate (mm, RAS) of the shown slice along the view's normal (S, A or R)."""
        voxel = np.array([s // 2 for s in self.volume.spatial_shape[::-1]] + [1], dtype=np.float64)
        voxel[2 - SLICED_AXIS[self.axis]] = self.index
        return float((self.volume.affine @ voxel)[2 - SLICED_AXIS[self.axis]])

    # ------------------------------------------------------------------ planes
    def plane(self, which: str = "image") -> np.ndarray:
        """The current slice as displayed: row 0 at the top, column 0 on the left.

        Args:
            which: ``"image"`` (grey values of the current channel) or ``"label"``.

        Returns:
            2D array ``(rows, columns)``; rows run top->bottom, columns left->right on screen.
        """
        if which == "label" and self.label is None:
            raise SpadkitError("this viewer has no label map", fix="pass label=... to SliceViewer.")
        source = self.label if which == "label" else self.volume
        channel = 0 if which == "label" else self.channel
        index: list[Any] = [channel, slice(None), slice(None), slice(None)]
        index[1 + SLICED_AXIS[self.axis]] = self.index
        return self.to_screen(_read(source.array, tuple(index)))

    def to_screen(self, plane: np.ndarray) -> np.ndarray:
        """A slice of the canonical grid ``(rows, columns)`` in array order, flipped as the current view shows it.

        The flips are their own inverse, so ``to_screen`` also maps a screen-ordered plane back to array order.
        """
        # canonical grid: rows (S or A) grow upward -> flip; columns grow toward R (or A in sagittal).
        plane = plane[::-1]
        flip_columns = self.axis == "sagittal" or self.convention == "radiological"
        return plane[:, ::-1] if flip_columns else plane

    def overlay_rgba(self) -> np.ndarray:
        """The label overlay of the current slice: ``(rows, columns, 4)`` float RGBA, alpha 0 on background."""
        labels = self.plane("label")
        rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
        present = labels > 0
        colors = np.asarray(LABEL_COLORS, dtype=np.float32)
        rgba[present, :3] = colors[(labels[present].astype(np.int64) - 1) % len(colors)]
        rgba[present, 3] = self.opacity_slider.value
        return rgba

    # ------------------------------------------------------------------ drawing
    def render(self) -> None:
        """Redraw the figure for the current controls and refresh the PNG shown."""
        self.figure.clear()
        self.ax = self.figure.add_subplot()
        plane = self.plane()
        vmin, vmax = self.display_range
        self.image = self.ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, aspect=self.aspect, interpolation="nearest")
        self.overlay = None
        if self.label is not None:
            self.overlay = self.ax.imshow(self.overlay_rgba(), aspect=self.aspect, interpolation="nearest")
            self._legend()
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        left, right, top, bottom = self.edge_letters
        for text, xy, align in ((left, (0.01, 0.5), "left"), (right, (0.99, 0.5), "right"), (top, (0.5, 0.99), "center"), (bottom, (0.5, 0.01), "center")):
            va = "top" if xy[1] > 0.9 else "bottom" if xy[1] < 0.1 else "center"
            self.ax.text(*xy, text, transform=self.ax.transAxes, color="yellow", ha=align, va=va, fontsize=11, fontweight="bold")
        world = "SAR"[SLICED_AXIS[self.axis]]
        last = self.volume.spatial_shape[SLICED_AXIS[self.axis]] - 1
        self.ax.set_title(f"{self.axis} {self.index}/{last}  {world} = {self.slice_position_mm:.1f} mm  ({self.convention})", fontsize=9)
        self.draw_layers()
        rows, cols = plane.shape
        height = np.clip(self.width_in * rows * self.aspect / max(cols, 1), 1.5, 2 * self.width_in)
        title_in = 0.3
        self.figure.set_size_inches(self.width_in, height + title_in)
        self.figure.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=height / (height + title_in))
        show_png(self.figure, self.image_widget)

    def draw_layers(self) -> None:
        """Draw extra layers on ``self.ax`` after the image and label overlay (a hook for subclasses; none here)."""

    def _legend(self) -> None:
        """Legend of the classes named in the label map's ``classes`` (background left out)."""
        names = {k: v for k, v in self.label.classes.items() if k > 0}
        if names:
            handles = [Patch(color=LABEL_COLORS[(k - 1) % len(LABEL_COLORS)], label=f"{k} {v}") for k, v in sorted(names.items())]
            self.ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ callbacks
    def _set_slice_range(self) -> None:
        """Slider range for the current view, at the middle slice."""
        size = self.volume.spatial_shape[SLICED_AXIS[self.axis]]
        with self.slice_slider.hold_trait_notifications():
            self.slice_slider.max = max(size - 1, 0)
            self.slice_slider.value = size // 2

    @contextmanager
    def held(self) -> Iterator[None]:
        """Change several controls with one redraw at the end (blocks may nest: the outermost one redraws)."""
        self._hold += 1
        try:
            yield
        finally:
            self._hold -= 1
        if not self._hold:
            self.render()

    def _on_axis(self, change: Mapping[str, Any]) -> None:
        with self.held():
            self._set_slice_range()

    def _on_change(self, change: Mapping[str, Any]) -> None:
        if not self._hold:
            self.render()

    def _on_auto(self, event: Any = None) -> None:
        (lo, hi), _ = self._windows[self.channel]
        with self.held():
            self.window_slider.value = max(hi - lo, self.window_slider.min)
            self.level_slider.value = (lo + hi) / 2
