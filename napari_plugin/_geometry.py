"""Where spadkit volumes sit in napari's world: radiological display of RAS volumes.

napari draws array axis -2 downwards and axis -1 to the right. A RAS volume
``(Z, Y, X)`` placed at positive scale would therefore show axial slices with
anterior at the bottom and the patient's right on the right, and coronal slices
upside down: 180 degrees from the radiological convention (../shared PITFALLS 21).

The layers made here place world axes ``(0, 1, 2)`` along Inferior, Posterior
and Left (mm): the RAS coordinates ``(z, y, x)`` negated, i.e. every layer has a
*negative* scale. napari's default view then shows

* axial slices with anterior up and the patient's right on the screen's left,
* coronal slices with superior up and the patient's right on the screen's left,
* sagittal slices with superior up and anterior on the left,

while the layer's data indices stay the stored voxel indices ``(z, y, x)`` of a
RAS canonical volume, so a painted label array is saved without any flipping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.utils.transforms import Affine

from spadkit.volume import array_order_affine

#: napari world ``(inferior, posterior, left)`` mm from world RAS ``(x, y, z)`` mm (its own inverse).
DISPLAY_FROM_RAS = np.array(
    [[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)

#: Layer attributes that together place a layer's data in napari's world.
TRANSFORM_KEYS = ("scale", "translate", "rotate", "shear", "affine")


def layer_transform(affine: np.ndarray) -> dict[str, Any]:
    """napari layer keywords that place a RAS-canonical volume radiologically.

    Args:
        affine: spadkit's 4x4 affine (voxel ``(x, y, z, 1)`` -> RAS mm) of a volume
            whose voxel axes point R, A, S (as stored; see :meth:`Volume.canonical`).

    Returns:
        ``scale`` (negative voxel sizes ``(Z, Y, X)`` mm), ``translate`` (mm) and
        ``rotate`` (3x3; the identity unless the volume is oblique).
    """
    display = DISPLAY_FROM_RAS @ array_order_affine(np.asarray(affine, dtype=np.float64))
    linear = display[:3, :3]
    # canonical RAS: each column's largest entry sits on the diagonal and is negative
    sign = np.where(np.diag(linear) < 0, -1.0, 1.0)
    scale = sign * np.linalg.norm(linear, axis=0)
    return {"scale": scale, "translate": display[:3, 3].copy(), "rotate": linear / scale}


def affine_of_layer(state: dict[str, Any]) -> np.ndarray:
    """spadkit's affine (voxel ``(x, y, z, 1)`` -> RAS mm) of a 3D layer in this module's world.

    Args:
        state: the layer's attributes, as napari hands them to writers
            (``scale``, ``translate``, ``rotate``, ``shear``, ``affine``).
    """
    composite = Affine(
        scale=state["scale"], translate=state["translate"], rotate=state.get("rotate"), shear=state.get("shear")
    ).affine_matrix
    outer = state.get("affine")
    outer = np.eye(4) if outer is None else np.asarray(getattr(outer, "affine_matrix", outer), dtype=np.float64)
    return array_order_affine(DISPLAY_FROM_RAS @ outer @ composite)
