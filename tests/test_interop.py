"""Interop with MONAI and TorchIO: spacing, orientation and voxel values survive the hand-over.

spadkit's affine indexes voxels ``(x, y, z)`` (the array's axes reversed, as
nibabel does); MONAI indexes them in array order and TorchIO wants the tensor in
NIfTI order. These tests resample and reorient with the peers' own transforms
and check the result against spadkit's geometry.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from spadkit.volume import Volume, array_order_affine

torch = pytest.importorskip("torch")
monai_data = pytest.importorskip("monai.data")
monai_transforms = pytest.importorskip("monai.transforms")
tio = pytest.importorskip("torchio")

#: An LPS-oriented, anisotropic (3 x 1 x 0.8 mm, Z x Y x X) grid with an offset origin.
LPS_AFFINE = np.array([[-0.8, 0.0, 0.0, 10.0], [0.0, -1.0, 0.0, 20.0], [0.0, 0.0, 3.0, -5.0], [0.0, 0.0, 0.0, 1.0]])
#: Voxel value = this linear function of the world (RAS mm) position, which linear interpolation keeps exactly.
RAMP = np.array([0.5, -0.25, 2.0])


def _world(affine_array_order: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World RAS coordinates ``(3, Z, Y, X)`` of every voxel centre, from an array-order affine."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", affine_array_order[:3, :3], index) + affine_array_order[:3, 3, None, None, None]


def _inside(world: np.ndarray, volume: Volume) -> np.ndarray:
    """Mask ``(Z, Y, X)`` of the world points that lie within ``volume``'s voxel centres (no extrapolation)."""
    to_index = np.linalg.inv(array_order_affine(volume.affine))
    index = np.einsum("ij,j...->i...", to_index[:3, :3], world) + to_index[:3, 3, None, None, None]
    bounds = np.asarray(volume.spatial_shape)[:, None, None, None] - 1
    return np.all((index > -1e-6) & (index < bounds + 1e-6), axis=0)


def _assert_ramp(values: np.ndarray, affine_array_order: np.ndarray, source: Volume) -> None:
    """``values`` ``(Z, Y, X)`` equal ``RAMP @ world`` wherever they lie inside ``source``."""
    world = _world(affine_array_order, values.shape)
    inside = _inside(world, source)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(values[inside], np.einsum("i,i...->...", RAMP, world)[inside], atol=1e-3)


@pytest.fixture
def ramp_volume() -> Volume:
    """(1, 8, 9, 10) float32 voxels whose value is ``RAMP @ world`` on :data:`LPS_AFFINE`."""
    shape = (8, 9, 10)
    values = np.einsum("i,i...->...", RAMP, _world(array_order_affine(LPS_AFFINE), shape))
    return Volume(values[None].astype(np.float32), LPS_AFFINE)


def test_array_order_affine_converts_a_torch_batch():
    batch = torch.as_tensor(np.stack([LPS_AFFINE, np.eye(4)]))  # (B, 4, 4), as a batch's affine
    converted = array_order_affine(batch)
    assert isinstance(converted, torch.Tensor) and converted.shape == (2, 4, 4)
    np.testing.assert_array_equal(converted[0].numpy(), array_order_affine(LPS_AFFINE))
    np.testing.assert_array_equal(array_order_affine(converted).numpy(), batch.numpy())


def test_metatensor_pixdim_is_spacing_of_an_anisotropic_volume():
    volume = Volume.from_spacing(np.zeros((1, 4, 5, 6), np.float32), (3.0, 1.0, 1.0))
    tensor = volume.to_metatensor()
    assert tuple(tensor.shape) == (1, 4, 5, 6)
    assert tuple(tensor.pixdim.tolist()) == (3.0, 1.0, 1.0)
    # the raw spadkit affine on the (C, Z, Y, X) tensor would read as (1, 1, 3) mm
    naive = monai_data.MetaTensor(tensor.as_tensor(), affine=torch.as_tensor(volume.affine))
    assert tuple(naive.pixdim.tolist()) == (1.0, 1.0, 3.0)


def test_monai_orientation_matches_canonical(ramp_volume):
    """MONAI's Orientation to S, A, R (array order of a RAS volume) gives spadkit's canonical volume."""
    oriented = monai_transforms.Orientation(axcodes="SAR", labels=None)(ramp_volume.to_metatensor())
    canonical = ramp_volume.canonical()
    assert canonical.orientation == "RAS"
    np.testing.assert_array_equal(oriented.numpy(), canonical.numpy())
    np.testing.assert_allclose(oriented.affine.numpy(), array_order_affine(canonical.affine))
    back = Volume.from_metatensor(oriented)
    assert back.orientation == "RAS" and back.spacing == pytest.approx(ramp_volume.spacing)
    np.testing.assert_allclose(back.affine, canonical.affine)


def test_metatensor_and_torchio_round_trips_are_exact(ramp_volume):
    for back in (Volume.from_metatensor(ramp_volume.to_metatensor()), Volume.from_torchio(ramp_volume.to_torchio())):
        assert back.shape == ramp_volume.shape
        np.testing.assert_array_equal(back.numpy(), ramp_volume.numpy())
        np.testing.assert_array_equal(back.affine, ramp_volume.affine)


def test_monai_spacing_resamples_in_spadkit_world(ramp_volume):
    """Spacing to 1.5 x 1 x 0.8 mm keeps value = RAMP @ world at every output voxel within the input."""
    resampled = monai_transforms.Spacing(pixdim=(1.5, 1.0, 0.8), mode="bilinear")(ramp_volume.to_metatensor())
    assert tuple(resampled.pixdim.tolist()) == pytest.approx((1.5, 1.0, 0.8))
    assert resampled.shape[1:] == (15, 9, 10)
    _assert_ramp(resampled.numpy()[0], resampled.affine.numpy(), ramp_volume)


def test_monai_spacing_on_real_mni_slices_restores_the_skipped_slices(mni_t1_path):
    """Keep every 3rd axial slice of the MNI T1 (a 3 x 1 x 1 mm volume); MONAI's Spacing back to 1 mm
    lands every kept slice exactly where it was and the voxels there are unchanged."""
    image = nib.load(mni_t1_path)
    full = np.asarray(image.dataobj[60:130, 70:150, 40:100], dtype=np.float32).transpose(2, 1, 0)  # (Z, Y, X)
    affine = image.affine.copy()
    affine[:3, 3] = (image.affine @ [60, 70, 40, 1])[:3]  # world position of the crop's first voxel
    thick = Volume(full[None, ::3], affine @ np.diag([1.0, 1.0, 3.0, 1.0]))
    assert thick.spacing == pytest.approx((3.0, 1.0, 1.0))
    resampled = monai_transforms.Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear")(thick.to_metatensor())
    np.testing.assert_allclose(resampled.affine.numpy(), array_order_affine(affine), atol=1e-6)
    kept = resampled.numpy()[0, ::3]
    np.testing.assert_allclose(kept, full[::3][: kept.shape[0]], atol=1e-3)
    between = resampled.numpy()[0, 1]
    np.testing.assert_allclose(between, (2 * full[0] + full[3]) / 3, atol=1e-2)  # linear between slices 0 and 3


def test_torchio_image_has_spadkit_geometry(ramp_volume):
    image = ramp_volume.to_torchio()
    assert image.shape == (1, 10, 9, 8)  # (C, X, Y, Z)
    assert image.spacing == pytest.approx(ramp_volume.spacing[::-1])
    assert "".join(image.orientation) == ramp_volume.orientation == "LPS"
    np.testing.assert_array_equal(image.data.numpy()[0].transpose(2, 1, 0), ramp_volume.numpy()[0])
    label = ramp_volume.to_torchio(label=True)
    assert isinstance(label, tio.LabelMap)


def test_torchio_canonical_and_resample_match_spadkit(ramp_volume):
    canonical = tio.ToCanonical()(ramp_volume.to_torchio())
    expected = ramp_volume.canonical()
    np.testing.assert_array_equal(canonical.data.numpy().transpose(0, 3, 2, 1), expected.numpy())
    np.testing.assert_allclose(canonical.affine, expected.affine)
    resampled = tio.Resample((0.8, 1.0, 1.5))(ramp_volume.to_torchio())  # TorchIO spacing is (x, y, z)
    back = Volume.from_torchio(resampled)
    assert back.spacing == pytest.approx((1.5, 1.0, 0.8))
    _assert_ramp(back.numpy()[0], array_order_affine(back.affine), ramp_volume)
