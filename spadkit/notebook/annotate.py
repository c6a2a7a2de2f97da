"""``Annotator``: the annotation loop of an :class:`~spadkit.active.AnnotationSession` as ipywidgets.

The notebook twin of the napari dock widget: the same session object, so a case
corrected here resumes in napari (and the other way round) with every correction::

    from spadkit.notebook import Annotator

    annotator = Annotator(session)      # display it: last expression of a cell
    annotator.next_button.click()       # every control is a public widget

What is drawn on the slice (a :class:`~spadkit.notebook.SliceViewer` underneath:
same orientation convention, window/level and physical aspect ratio):

* the **draft** (filled, coloured by class): what *Learn* will submit for this
  slice. It starts as the session's label where a person already reviewed the
  slice and as the current prediction elsewhere, so correcting means editing
  the prediction;
* the **prediction** (a lime outline) and its **uncertainty** (entropy / log K,
  a magma heat map whose opacity is the ``uncertainty`` slider);
* the **seed** (a red cross) and, dashed cyan, the region the threshold tool
  would take from it.

Correction tools, both placed by the seed sliders (``seed_row``, ``seed_column``,
in screen pixels; ipywidgets' ``Image`` reports no mouse clicks):

* **threshold and region**: the connected region (8-connected, scikit-image) of
  pixels whose grey value lies in ``threshold_slider``'s range and that holds the
  seed; ``add region`` sets it to the chosen class, ``remove region`` to background;
* **brush**: a disk of ``brush_slider`` pixels at the seed; ``paint`` / ``erase``.

Buttons: ``Learn`` (``session.submit_correction`` of the whole slice: every pixel
of it counts as reviewed), ``Next suggested slice`` (``session.suggest_next``),
``undo edit`` (the last tool edit of this slice, not yet learned) and ``undo round``
(``session.undo``: a new label version with the content before the last correction).
The plot below shows, per round, the edit Dice (the prediction shown vs the
submitted correction) and the Dice on the session's fixed validation slices.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from skimage.draw import disk
from skimage.segmentation import flood

from spadkit.active import AnnotationSession, SessionPrediction
from spadkit.active.history import AXIS_NAMES
from spadkit.errors import SpadkitError
from spadkit.notebook.viewer import AXES, LABEL_COLORS, SLICED_AXIS, SliceViewer, show_png, widgets
from spadkit.volume import LabelVolume

try:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"spadkit.notebook needs matplotlib ({err}); install it with: pip install 'spadkit[notebooks]'") from err

#: Colours of the layers drawn over the slice.
PREDICTION_COLOR, PREVIEW_COLOR, SEED_COLOR = "lime", "cyan", "red"
#: Rounds at most drawn in the Dice plot (the latest ones).
PLOT_ROUNDS = 50


class Annotator(SliceViewer):
    """Correct slices of a session's case, learn from them and follow the session's suggestions.

    Controls (public ipywidgets; code and tests drive them as a user would), besides the
    :class:`SliceViewer` ones: ``uncertainty_slider`` (heat-map opacity), ``seed_row`` and
    ``seed_column`` (screen pixel of the tools), ``threshold_slider`` (grey range, image
    units), ``class_dropdown`` (the class the tools add), ``add_region_button``,
    ``remove_region_button``, ``brush_slider`` (radius in pixels), ``paint_button``,
    ``erase_button``, ``undo_edit_button``, ``learn_button``, ``next_button``,
    ``undo_round_button``; read-outs ``status`` (HTML) and ``dice_plot`` (PNG).

    Args:
        session: the loop; its store must be writable for *Learn* and *undo round*.
        axis, convention, opacity, width_in: as for :class:`SliceViewer` (``opacity``: the draft's).

    Raises:
        SpadkitError: the case is not stored in RAS orientation (spadkit's ingest always stores RAS).
    """

    def __init__(self, session: AnnotationSession, *, axis: str = "axial", convention: str = "radiological", opacity: float = 0.35, width_in: float = 5.0):
        image = session.store.read_image(session.case_id)
        if image.orientation != "RAS":
            raise SpadkitError(
                f"the annotator shows RAS-stored cases, case {session.case_id} is stored {image.orientation}",
                path=f"{session.store.url}/{session.case_id}",
                fix="ingest the image with spadkit.ingest (it stores RAS), or write image.canonical() to the store.",
            )
        self.session = session
        #: ``(axis, index, model version)`` of the prediction on screen, and the prediction
        self._shown_key: tuple[str, int, str] | None = None
        self._prediction: SessionPrediction | None = None
        #: tool edits not yet learned, per ``(axis, index)``: the draft planes (array order) before each edit
        self._edits: dict[tuple[str, int], list[np.ndarray]] = {}
        self.status = widgets.HTML()
        self._build_tools(image)
        overlay = np.zeros((1, *session.shape), np.uint8)
        self.draft: np.ndarray = overlay[0]  # (Z, Y, X): the viewer's label layer, edited in place
        super().__init__(image, label=LabelVolume(overlay, image.affine), axis=axis, convention=convention, opacity=opacity, width_in=width_in)
        self.opacity_slider.description = "draft"
        self.dice_plot = widgets.Image(format="png")
        self.dice_figure = Figure(figsize=(4.0, 2.6), layout="constrained")
        self._wire()
        self.widget.children = (*self.widget.children, *self._panels())
        self.widget.add_class("spadkit-annotator")
        with self.held():
            self._fit_seed()
        self.plot_rounds()
        self._say(f"{session!r}. Correct the slice with the tools, then click <b>Learn</b>.")

    # ------------------------------------------------------------------ widgets
    def _build_tools(self, image: Any) -> None:
        (lo, hi), (vmin, vmax) = self._band_guess(image)
        step = (vmax - vmin) / 500
        self.uncertainty_slider = widgets.FloatSlider(description="uncertainty", min=0.0, max=1.0, step=0.05, value=0.5, continuous_update=False)
        self.seed_row = widgets.IntSlider(description="seed row", min=0, max=1, continuous_update=False)
        self.seed_column = widgets.IntSlider(description="seed col", min=0, max=1, continuous_update=False)
        self.threshold_slider = widgets.FloatRangeSlider(description="threshold", min=vmin, max=vmax, step=step, value=(lo, hi), readout_format=".4g", continuous_update=False, layout={"width": "420px"})
        classes = list(range(1, self.session.num_classes))
        self.class_dropdown = widgets.Dropdown(description="class", options=classes, value=classes[0], disabled=len(classes) == 1, layout={"width": "160px"})
        self.add_region_button = widgets.Button(description="add region", tooltip="set the connected thresholded region holding the seed to the class")
        self.remove_region_button = widgets.Button(description="remove region", tooltip="set that region to background")
        self.brush_slider = widgets.IntSlider(description="brush", min=1, max=30, value=4, continuous_update=False)
        self.paint_button = widgets.Button(description="paint", tooltip="paint a disk of the brush radius at the seed")
        self.erase_button = widgets.Button(description="erase", tooltip="erase a disk of the brush radius at the seed")
        self.undo_edit_button = widgets.Button(description="undo edit", tooltip="undo the last tool edit of this slice (not yet learned)")
        self.learn_button = widgets.Button(description="Learn", button_style="success", tooltip="save this slice as a correction and refit the model")
        self.next_button = widgets.Button(description="Next suggested slice", button_style="info", layout={"width": "180px"}, tooltip="go to the slice the session suggests")
        self.undo_round_button = widgets.Button(description="undo round", button_style="warning", tooltip="undo the last learned correction (a new label version)")

    @staticmethod
    def _band_guess(image: Any) -> tuple[tuple[float, float], tuple[float, float]]:
        """A first threshold range (the middle third of the 1-99 percentiles) and the grey range of the middle axial slice."""
        plane = np.asarray(image.array[0, image.spatial_shape[0] // 2], np.float64)
        lo, hi = np.percentile(plane, [1, 99])
        vmin, vmax = float(plane.min()), float(plane.max())
        return (lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3), (vmin, vmax if vmax > vmin else vmin + 1.0)

    def _wire(self) -> None:
        for control in (self.uncertainty_slider, self.seed_row, self.seed_column, self.threshold_slider):
            control.observe(self._on_change, names="value")
        actions: dict[Any, Callable[[], Any]] = {
            self.add_region_button: lambda: self.edit_region(add=True),
            self.remove_region_button: lambda: self.edit_region(add=False),
            self.paint_button: lambda: self.brush(paint=True),
            self.erase_button: lambda: self.brush(paint=False),
            self.undo_edit_button: self.undo_edit,
            self.learn_button: self.learn,
            self.next_button: self.next_suggested,
            self.undo_round_button: self.undo_round,
        }
        for button, action in actions.items():
            button.on_click(lambda _, action=action: self._run(action))

    def _panels(self) -> list[Any]:
        box = widgets.HBox
        tools = widgets.VBox(
            [
                self.uncertainty_slider,
                box([self.seed_row, self.seed_column]),
                box([self.threshold_slider, self.class_dropdown]),
                box([self.add_region_button, self.remove_region_button, self.brush_slider, self.paint_button, self.erase_button]),
                box([self.undo_edit_button, self.learn_button, self.next_button, self.undo_round_button]),
            ]
        )
        return [tools, self.status, self.dice_plot]

    def _run(self, action: Callable[[], Any]) -> None:
        """Run a button's action; a refusal (e.g. nothing to undo, a read-only store) is shown, not raised."""
        try:
            action()
        except SpadkitError as error:
            self._say(f"<span style='color:#b00'>{html.escape(str(error))}</span>")

    def _say(self, html: str) -> None:
        self.status.value = f"<div style='max-width:60em'>{html}</div>"

    # ------------------------------------------------------------------ the current slice
    @property
    def session_axis(self) -> int:
        """The session's array axis (0 = z, 1 = y, 2 = x) that the current view slices."""
        return SLICED_AXIS[self.axis]

    def _index(self) -> tuple[Any, ...]:
        """Index of the current slice in a ``(Z, Y, X)`` array."""
        index: list[Any] = [slice(None)] * 3
        index[self.session_axis] = self.index
        return tuple(index)

    @property
    def prediction(self) -> SessionPrediction:
        """The session's prediction of the current slice (predicted when the slice or the model changed).

        Entering a slice also resets its draft, unless it holds edits not yet learned.
        """
        key = (self.axis, self.index, self.session.model_version)
        if key != self._shown_key or self._prediction is None:
            region = [slice(None)] * 3
            region[self.session_axis] = slice(self.index, self.index + 1)
            self._prediction = self.session.predict(tuple(region))
            self._shown_key = key
            if not self._edits.get(key[:2]):
                self._reset_draft()
        return self._prediction

    def _array_plane(self, volume: np.ndarray) -> np.ndarray:
        """The current slice of a ``(..., z, y, x)`` prediction array: drop its singleton sliced axis."""
        return np.take(volume, 0, axis=volume.ndim - 3 + self.session_axis)

    def _reset_draft(self) -> None:
        """Draft of the current slice = the session's label where reviewed, the prediction elsewhere."""
        index = self._index()
        predicted = self._array_plane(self._prediction.labels)
        self.draft[index] = np.where(self.session.annotated[index], self.session.label[index], predicted)

    def draft_plane(self) -> np.ndarray:
        """The draft of the current slice, in array order (what *Learn* submits): ``(Y, X)``, ``(Z, X)`` or ``(Z, Y)``."""
        self.prediction  # noqa: B018 - entering the slice initialises its draft
        return self.draft[self._index()].copy()

    def set_draft(self, plane: np.ndarray) -> None:
        """Replace the current slice's draft by ``plane`` (array order, class labels) as one undoable edit."""
        plane = np.asarray(plane)
        expected = self.draft[self._index()].shape
        if plane.shape != expected:
            raise SpadkitError(f"a draft of shape {plane.shape} for a slice of shape {expected}", fix=f"pass a {expected} array in array (Z, Y, X) order.")
        self._edit(lambda screen: self.to_screen(plane))

    def _edit(self, change: Callable[[np.ndarray], np.ndarray]) -> int:
        """Apply ``change`` (screen draft plane -> new screen draft plane), keep the old plane for *undo edit*; redraw.

        Returns:
            Pixels whose class changed.
        """
        index, before = self._index(), self.draft_plane()
        after = self.to_screen(np.asarray(change(self.to_screen(before)), np.uint8))
        self._edits.setdefault((self.axis, self.index), []).append(before)
        self.draft[index] = after
        self.render()
        return int((after != before).sum())

    # ------------------------------------------------------------------ tools
    @property
    def seed(self) -> tuple[int, int]:
        """``(row, column)`` of the seed on screen (inside the current view)."""
        rows, columns = self.plane().shape
        return min(int(self.seed_row.value), rows - 1), min(int(self.seed_column.value), columns - 1)

    def _on_axis(self, change: Any) -> None:
        with self.held():
            super()._on_axis(change)
            self._fit_seed()

    def _fit_seed(self) -> None:
        """Seed sliders span the current view, the seed at its centre."""
        rows, columns = self.plane().shape
        with self.held():
            for slider, size in ((self.seed_row, rows), (self.seed_column, columns)):
                slider.max = max(size - 1, 0)
                slider.value = size // 2

    def region(self) -> np.ndarray:
        """Screen ``(rows, columns)`` bool: the 8-connected pixels inside the threshold range that hold the seed."""
        lo, hi = self.threshold_slider.value
        plane = self.plane()
        inside = (plane >= lo) & (plane <= hi)
        if not inside[self.seed]:
            return np.zeros_like(inside)
        return flood(inside.astype(np.uint8), self.seed, connectivity=2)

    def edit_region(self, *, add: bool) -> int:
        """Set the seed's thresholded region to the chosen class (``add``) or to background. Returns pixels changed."""
        region = self.region()
        if not region.any():
            raise SpadkitError("the seed is outside the threshold range: no region", fix="move the seed onto the structure or widen the threshold range.")
        value = self.class_dropdown.value if add else 0
        changed = self._edit(lambda screen: np.where(region, value, screen))
        self._say(f"{'added' if add else 'removed'} a region of {int(region.sum())} pixels ({changed} changed)")
        return changed

    def brush(self, *, paint: bool) -> int:
        """Paint the chosen class (``paint``) or background in a disk of the brush radius at the seed. Returns pixels changed."""

        def stroke(screen: np.ndarray) -> np.ndarray:
            rows, columns = disk(self.seed, self.brush_slider.value, shape=screen.shape)
            screen = screen.copy()
            screen[rows, columns] = self.class_dropdown.value if paint else 0
            return screen

        changed = self._edit(stroke)
        self._say(f"{'painted' if paint else 'erased'} {changed} pixels")
        return changed

    def undo_edit(self) -> None:
        """Restore the current slice's draft before its last tool edit (edits not yet learned)."""
        stack = self._edits.get((self.axis, self.index))
        if not stack:
            raise SpadkitError("no edit of this slice to undo", fix="'undo round' undoes a correction already learned.")
        self.draft[self._index()] = stack.pop()
        self.render()
        self._say(f"edit undone ({len(stack)} left on this slice)")

    # ------------------------------------------------------------------ the loop
    def learn(self) -> Any:
        """Submit the current slice's draft as a correction (saved as a new label version first), refit, redraw.

        Returns:
            The session's :class:`~spadkit.active.Round`.
        """
        result = self.session.submit_correction(self.session_axis, self.index, self.draft_plane())
        self._edits.pop((self.axis, self.index), None)
        self._prediction, self._shown_key = result.prediction, (self.axis, self.index, result.prediction.model)  # this slice, refreshed
        self._reset_draft()  # now the saved label
        self.render()
        self.plot_rounds()
        edit = "-" if result.edit_dice is None else f"{result.edit_dice:.3f}"
        validation = "-" if result.validation_dice is None else f"{result.validation_dice:.3f}"
        self._say(
            f"learned {self.axis} slice {self.index} &rarr; label version {result.version}: {result.voxels_changed} voxels changed, "
            f"edit Dice {edit}, validation Dice {validation}, refreshed in {result.timings['refresh_s']:.2f} s"
        )
        return result

    def next_suggested(self) -> Any:
        """Show the slice the session suggests correcting next. Returns the :class:`~spadkit.active.Suggestion`."""
        hint = self.session.suggest_next()
        with self.held():
            self.axis_buttons.value = AXES[hint.axis]
            self.slice_slider.value = hint.index
        self._say(f"suggested: {AXES[hint.axis]} ({AXIS_NAMES[hint.axis]}) slice {hint.index}, score {hint.score:.2f}: {hint.reason}")
        return hint

    def undo_round(self) -> Any:
        """Undo the last learned correction (``session.undo``), redraw. Returns the session's :class:`~spadkit.active.Round`."""
        result = self.session.undo()
        self.render()  # a new model version: the slice is re-predicted
        self.plot_rounds()
        self._say(f"undone: label version {result.version} restores the content before version {self.session.history()[-1].get('target')}")
        return result

    def rounds(self) -> list[dict[str, Any]]:
        """The session's rounds, oldest first: ``round`` (1, 2, ...), ``version``, ``op``, ``edit_dice``, ``validation_dice``."""
        return [
            {"round": i, "version": row["version"], "op": row.get("op"), "edit_dice": row.get("edit_dice"), "validation_dice": row.get("validation_dice")}
            for i, row in enumerate(self.session.history(), start=1)
        ]

    def plot_rounds(self) -> None:
        """Redraw the Dice-per-round plot from the session's history."""
        rounds = self.rounds()[-PLOT_ROUNDS:]
        self.dice_figure.clear()
        ax = self.dice_figure.add_subplot()
        for key, label, marker in (("edit_dice", "edit Dice (prediction vs correction)", "o"), ("validation_dice", "validation Dice (fixed slices)", "s")):
            points = [(r["round"], r[key]) for r in rounds if r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker=marker, label=label)
        restores = [r["round"] for r in rounds if r["op"] != "correction"]
        for i, at in enumerate(restores):
            ax.axvline(at, color="grey", linestyle=":", linewidth=1, label="undo / redo" if i == 0 else None)
        ax.set(xlabel="round", ylabel="Dice", ylim=(0, 1.02), title="Dice per round" + ("" if rounds else " (no round yet)"))
        ax.title.set_fontsize(9)
        if rounds:
            ax.set_xlim(rounds[0]["round"] - 0.5, rounds[-1]["round"] + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
        show_png(self.dice_figure, self.dice_plot)

    # ------------------------------------------------------------------ drawing
    def draw_layers(self) -> None:
        """Uncertainty heat map, prediction outline, region preview and seed over the slice; the legend."""
        prediction = self.prediction
        uncertainty = self.to_screen(self._array_plane(prediction.uncertainty)) / math.log(self.session.num_classes)
        alpha = np.clip(uncertainty, 0, 1) * self.uncertainty_slider.value
        self.ax.imshow(uncertainty, cmap="magma", vmin=0, vmax=1, alpha=alpha, aspect=self.aspect, interpolation="nearest")
        self.overlay.set_zorder(1)  # the draft (the base class's label layer) stays on top of the heat map
        predicted = self.to_screen(self._array_plane(prediction.labels))
        if predicted.any():
            self.ax.contour(predicted > 0, levels=[0.5], colors=PREDICTION_COLOR, linewidths=0.8)
        region = self.region()
        if region.any():
            self.ax.contour(region, levels=[0.5], colors=PREVIEW_COLOR, linewidths=0.8, linestyles="dashed")
        row, column = self.seed
        self.ax.plot(column, row, marker="+", color=SEED_COLOR, markersize=12, markeredgewidth=1.5)
        reviewed = bool(self.session.annotated[self._index()].all())
        self.ax.set_title(self.ax.get_title() + ("  [corrected]" if reviewed else ""), fontsize=9)
        handles = [
            Patch(color=LABEL_COLORS[(self.class_dropdown.value - 1) % len(LABEL_COLORS)], label="draft (Learn submits it)"),
            Line2D([], [], color=PREDICTION_COLOR, label="prediction"),
            Line2D([], [], color=PREVIEW_COLOR, linestyle="dashed", label="region preview"),
            Patch(color="orange", label="uncertainty"),
        ]
        self.ax.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6)

