"""Build small DICOM datasets in tests (projection radiographs without patient geometry)."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: SOP class of digital X-ray images (for presentation).
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def radiograph_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **tags) -> pydicom.Dataset:
    """A single-frame DX dataset holding ``pixels`` ``(rows, columns)`` (uint8/uint16/int16), no ImageOrientationPatient.

    ``tags`` are set as attributes, e.g. ``PatientOrientation=["L", "F"]``, ``PixelSpacing=[0.2, 0.1]``.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.itemsize
    ds.BitsStored = bits_stored or 8 * pixels.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds
