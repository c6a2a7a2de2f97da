"""Fixtures for the napari plugin: a small marked RAS store and a folder for screenshots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from npe2 import PluginManager
from PIL import Image

from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume, Volume

#: (Z, Y, X) voxels and mm of the marked volume: 20 slices of 3 mm, 96 x 80 pixels of 1 mm.
SHAPE = (20, 96, 80)
SPACING = (3.0, 1.0, 1.0)
ORIGIN_XYZ = (-40.0, -50.0, -30.0)
#: voxels of the bright marker: superior, anterior and on the patient's right (high z, y and x).
MARKER = (slice(14, 18), slice(70, 90), slice(56, 76))
CLASSES = {0: "background", 1: "marker", 2: "block"}


@pytest.fixture(autouse=True, scope="session")
def installed_plugins() -> None:
    """Find installed npe2 manifests (napari does it when it starts a viewer) so layer.save finds spadkit's writer."""
    PluginManager.instance().discover()


@pytest.fixture
def marked_case() -> tuple[Volume, LabelVolume]:
    """A RAS image (int16: air 0, a head box of 150-299, the marker 1000) and its label map (1 on the marker, 2 on a central block)."""
    data = np.zeros(SHAPE, np.int16)
    data[:, 8:88, 6:74] = np.random.default_rng(0).integers(150, 300, size=(SHAPE[0], 80, 68))  # the "head"
    data[MARKER] = 1000
    labels = np.zeros(SHAPE, np.uint8)
    labels[MARKER] = 1
    labels[6:10, 30:50, 20:40] = 2
    image = Volume.from_spacing(data, SPACING, ORIGIN_XYZ, modality="MR")
    return image, LabelVolume(labels, image.affine, classes=CLASSES)


@pytest.fixture
def store_path(tmp_path: Path, marked_case: tuple[Volume, LabelVolume]) -> Path:
    """A spadkit store holding the marked case as ``brain`` (two pyramid levels, label ``seg`` v1, ingest's statistics)."""
    path = tmp_path / "marked.zarr"
    OMEZarrStore(str(path), mode="a").write_case("brain", *marked_case, attrs={"intensity": intensity_stats(*marked_case)})
    return path


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshot folder: ``$SPADKIT_TEST_ARTIFACTS/napari`` or ``tests/artifacts/napari`` (ignored by git)."""
    root = os.environ.get("SPADKIT_TEST_ARTIFACTS")
    if root is None:
        root = Path(__file__).resolve().parents[1] / "artifacts"
        root.mkdir(exist_ok=True)
        (root / ".gitignore").write_text("*\n")  # the folder ignores itself
    folder = Path(root) / "napari"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_screenshot(viewer, folder: Path, name: str, canvas_only: bool = True) -> np.ndarray:
    """The viewer's screenshot (RGBA, H x W x 4), saved as ``folder/name.png``."""
    shot = viewer.screenshot(canvas_only=canvas_only, flash=False)
    Image.fromarray(shot).save(folder / f"{name}.png")
    return shot


#: Dims orders that show each view: (sliced world axis, rows, columns).
VIEWS = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def marker_offset(viewer, layer, view: str, folder: Path, name: str) -> tuple[float, float]:
    """Screen offset (rows, columns; pixels) of the bright marker from the image's centre in ``view``.

    Slices through the marker's centre, saves the canvas as ``folder/name_view.png``; the
    footprint is every non-black pixel, the marker every bright one (other layers hidden).
    """
    z, y, x = (int(np.mean([s.start, s.stop - 1])) for s in MARKER)
    world = layer.data_to_world((z, y, x))
    order = VIEWS[view]
    viewer.dims.order = order
    viewer.dims.set_point(order[0], world[order[0]])
    viewer.reset_view()
    shot = save_screenshot(viewer, folder, f"{name}_{view}")[..., :3].mean(axis=2)
    inside, marker = np.argwhere(shot > 10), np.argwhere(shot > 200)
    if len(marker) < 50:
        raise AssertionError(f"the marker is not on screen in the {view} view ({len(marker)} bright pixels)")
    rows, cols = marker.mean(axis=0) - inside.mean(axis=0)
    return float(rows), float(cols)
