"""What the annotation widget shows, apart from Qt: layer arrays, the slice on screen, grid checks.

The widget (:mod:`spadkit_napari._widgets`) keeps one :class:`ShownLayers` per
session: full-grid arrays behind four napari layers, filled region by region as
the session predicts. The labels layer is the one a person corrects: the
session's label where a person reviewed it, the model's prediction elsewhere.

Slices are addressed like the session addresses them: ``axis`` 0, 1, 2 = the
volume's Z, Y, X voxel axes (axial, coronal, sagittal for a RAS case), ``index``
the voxel along it. The layers are placed by
:func:`spadkit_napari._geometry.layer_transform` (radiological, negative scales),
as the reader places the case's image, so a layer's world axes are its data axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from spadkit.active import AnnotationSession, SessionPrediction
from spadkit.active.history import AXIS_NAMES
from spadkit.errors import GeometryMismatchError, SpadkitError
from spadkit.volume import AFFINE_ATOL_MM

from ._geometry import TRANSFORM_KEYS, affine_of_layer, layer_transform
from ._reader import LayerData
from ._writer import NEW_LAYER_FIX

Box = tuple[slice, slice, slice]

#: ``viewer.dims.order`` that slices each voxel axis (0 axial, 1 coronal, 2 sagittal; see the reader's tests).
DIMS_ORDER = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}
#: Columns of the widget's history table, one row per session version.
HISTORY_COLUMNS = ("op", "slice", "edit Dice", "val. Dice", "voxels", "learn s")


@dataclasses.dataclass
class ShownLayers:
    """Full-grid ``(Z, Y, X)`` arrays behind the widget's layers; zero where nothing was predicted yet.

    Attributes:
        probability: float32, the model's probability that a voxel is not background (0..1).
        uncertainty: float32, predictive entropy in nats (0 .. log K).
        predicted: uint8, the model's labels.
        labels: uint8, what the corrections layer shows: the session's label where a person
            reviewed it, ``predicted`` elsewhere.
    """

    probability: np.ndarray
    uncertainty: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, session: AnnotationSession) -> ShownLayers:
        """Empty predictions and the session's reviewed labels, on the session's grid."""
        zeros = np.zeros(session.shape, np.float32)
        shown = cls(zeros, zeros.copy(), np.zeros(session.shape, np.uint8), np.zeros(session.shape, np.uint8))
        shown.review(session)
        return shown

    def update(self, prediction: SessionPrediction) -> None:
        """Write a region's prediction into the arrays (``labels`` follows with :meth:`review`)."""
        box = prediction.region
        self.probability[box] = 1.0 - prediction.probs[0]
        self.uncertainty[box] = prediction.uncertainty
        self.predicted[box] = prediction.labels

    def review(self, session: AnnotationSession) -> None:
        """Recompose ``labels``: reviewed voxels from the session's label, the rest from ``predicted``."""
        np.copyto(self.labels, np.where(session.annotated, session.label, self.predicted), casting="unsafe")


def session_layers(session: AnnotationSession, shown: ShownLayers, info: dict[str, Any]) -> dict[str, LayerData]:
    """The layer tuples of a session, keyed ``probability``, ``uncertainty`` and ``labels``.

    Uncertainty is drawn over 0 .. log K nats with gamma 0.5 (inferno, additive), so that the
    moderate uncertainty of a model that has learned a few slices still shows.

    Every layer sits on the case's grid like the reader's image (mm, radiological) and holds
    a ``shown`` array itself (no copy), so updating ``shown`` and refreshing updates the view.
    """
    place = {"units": "mm", "metadata": {"spadkit": info}, **layer_transform(session.affine)}
    case, label = session.case_id, session.label_name
    return {
        "probability": (shown.probability, {**place, "name": f"{case} probability", "colormap": "viridis", "contrast_limits": (0.0, 1.0), "visible": False}, "image"),
        "uncertainty": (
            shown.uncertainty,
            {**place, "name": f"{case} uncertainty", "colormap": "inferno", "blending": "additive", "gamma": 0.5, "contrast_limits": (0.0, math.log(session.num_classes))},
            "image",
        ),
        "labels": (shown.labels, {**place, "name": f"{label} (session)", "opacity": 0.5}, "labels"),
    }


def check_on_grid(layer: Any, session: AnnotationSession) -> None:
    """Refuse a labels layer that does not lie voxel for voxel on the session's image grid.

    Raises:
        GeometryMismatchError: another shape, scale, position or rotation (names both and the fix).
    """
    data = layer.data
    shape = tuple(np.shape(data[0] if isinstance(data, list | tuple) else data))
    state = {key: getattr(layer, key) for key in TRANSFORM_KEYS}
    state["affine"] = layer.affine.affine_matrix
    if shape == session.shape and np.allclose(affine_of_layer(state), session.affine, atol=AFFINE_ATOL_MM):
        return
    expected = layer_transform(session.affine)["scale"]
    raise GeometryMismatchError(
        f"labels layer {layer.name!r} (shape {shape}, scale {_mm(layer.scale)} mm) is not on the grid of case "
        f"{session.case_id} (shape {session.shape}, scale {_mm(expected)} mm); nothing was submitted",
        fix=NEW_LAYER_FIX,
    )


def _mm(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def slice_on_screen(viewer: Any, layer: Any) -> tuple[int, int]:
    """``(axis, index)`` of the voxel slice of ``layer`` the viewer shows now (its current dims).

    Raises:
        SpadkitError: the viewer shows 3D, or the slice is outside the layer.
    """
    if viewer.dims.ndisplay != 2:
        raise SpadkitError("the viewer shows 3D: there is no slice on screen", fix="switch to the 2D view (the square button at the bottom left) and pick the slice.")
    offset = viewer.dims.ndim - layer.ndim
    axis = viewer.dims.not_displayed[-1] - offset
    index = int(np.round(layer.world_to_data(viewer.dims.point[offset:])[axis]))
    size = layer.data.shape[axis]
    if not 0 <= index < size:
        raise SpadkitError(f"the {AXIS_NAMES[axis]} slice on screen ({index}) is outside the case's 0..{size - 1}", fix="move the slider onto the case.")
    return axis, index


def show_slice(viewer: Any, layer: Any, axis: int, index: int) -> None:
    """Slice the viewer along voxel ``axis`` at ``index`` of ``layer`` (a single-scale layer; 2D view, refitted when the axis changes)."""
    viewer.dims.ndisplay = 2
    offset = viewer.dims.ndim - layer.ndim
    order = tuple(range(offset)) + tuple(offset + a for a in DIMS_ORDER[axis])
    centre = (np.asarray(layer.data.shape) - 1) / 2.0
    centre[axis] = index
    world = layer.data_to_world(centre)
    if tuple(viewer.dims.order) != order:
        viewer.dims.order = order
        viewer.reset_view()
    viewer.dims.set_point(offset + axis, world[axis])


def write_slice(layer: Any, axis: int, index: int, plane: np.ndarray) -> None:
    """Write a corrected ``plane`` into slice ``index`` along ``axis`` of a labels layer, as napari's paint and
    fill tools write (``Labels.data_setitem``: one undoable edit, the view refreshed); for scripted corrections."""
    where = [i.ravel() for i in np.indices(plane.shape)]
    where.insert(axis, np.full(plane.size, index))
    layer.data_setitem(tuple(where), np.asarray(plane).ravel())


def slice_region(axis: int, index: int) -> tuple[slice, ...]:
    """The session region ``(z, y, x)`` of one slice."""
    return tuple(slice(index, index + 1) if a == axis else slice(None) for a in range(3))


def history_rows(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The session's history as a magicgui ``Table`` value: one row per version (correction, undo, redo)
    and per full fine-tune (whether its weights were accepted), oldest first."""
    rows = []
    for row in history:
        if row["op"] == "finetune":  # a full fine-tune of the backbone: its validation Dice and wall time
            rows.append(["finetune", "accepted" if row["accepted"] else "rejected", "-", _fixed(row["validation_dice_after"]), 0, _fixed(row["seconds"], 1)])
            continue
        item = row.get("item", {})
        where = f"{AXIS_NAMES[item['axis']]} {item['index']}" if "axis" in item else ("box" if item else f"v{row.get('target')}")
        learn = row.get("timings", {}).get("learn_s")
        rows.append([row["op"], where, _fixed(row.get("edit_dice")), _fixed(row.get("validation_dice")), row.get("voxels_changed", 0), _fixed(learn, 2)])
    return {"data": rows, "index": [f"v{row['version']}" for row in history], "columns": list(HISTORY_COLUMNS)}


def _fixed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
