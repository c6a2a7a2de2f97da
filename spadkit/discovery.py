"""Finding the cases of a dataset folder: image files (or DICOM folders), channel files and labels.

Layouts: ``msd``, ``nnunet``, ``flat``, ``dicom_series``, ``image_folder``
(see :func:`discover_cases`); used by :func:`spadkit.ingest.ingest`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spadkit.errors import InvalidImageError
from spadkit.io import SUPPORTED_SUFFIXES
from spadkit.io.dicom import is_dicom_file

_IMAGE_SUFFIXES = tuple(SUPPORTED_SUFFIXES)


@dataclass(frozen=True)
class CaseSource:
    """The files of one case: image channel files (or one DICOM folder) and an optional label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


def case_id_from(name: str) -> str:
    """A store-safe case id from a file or folder name (suffixes dropped)."""
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._-") or "case"


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and (path.name.lower().endswith(_IMAGE_SUFFIXES) or is_dicom_file(path))


def discover_cases(root: str | os.PathLike, layout: str | None = None) -> list[CaseSource]:
    """Find the cases of a dataset folder.

    Layouts (auto-detected when ``layout`` is None):

    * ``msd``: ``imagesTr/x.nii.gz`` + ``labelsTr/x.nii.gz`` (+ unlabelled ``imagesTs/``);
      multi-modal tasks hold channels in a 4D file.
    * ``nnunet``: ``imagesTr/x_0000.nii.gz``, ``x_0001...`` (channels) + ``labelsTr/x.nii.gz``.
    * ``flat``: ``images/`` + ``labels/`` with matching names, or image files at the top level.
    * ``dicom_series``: every folder that directly holds DICOM files is one case.
    * ``image_folder``: every 2D image file below the folder is one case.

    macOS resource forks (``._name``) and hidden files are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidImageError("dataset folder not found", path=root, fix="pass the folder that holds the extracted dataset.")
    layout = layout or _detect_layout(root)
    if layout in ("msd", "nnunet"):
        cases = _paired_cases(root / "imagesTr", root / "labelsTr", channel_suffix=layout == "nnunet")
        if (root / "imagesTs").is_dir():
            cases += _paired_cases(root / "imagesTs", None, channel_suffix=layout == "nnunet")
    elif layout == "flat":
        if (root / "images").is_dir():
            cases = _paired_cases(root / "images", root / "labels" if (root / "labels").is_dir() else None, channel_suffix=False)
        else:
            cases = [CaseSource(case_id_from(p.name), (p,)) for p in sorted(root.iterdir()) if _is_image_file(p)]
    elif layout == "dicom_series":
        folders = sorted({p.parent for p in root.rglob("*") if p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p))})
        cases = [CaseSource(case_id_from("_".join(f.relative_to(root).parts) or root.name), (f,)) for f in folders]
    elif layout in ("image_folder", "other"):
        files = sorted(p for p in root.rglob("*") if _is_image_file(p))
        cases = [CaseSource(case_id_from("_".join(p.relative_to(root).parts)), (p,)) for p in files]
    else:
        raise InvalidImageError(f"unknown layout {layout!r}", path=root, fix="use msd, nnunet, flat, dicom_series or image_folder.")
    if not cases:
        raise InvalidImageError(f"no cases found (layout {layout})", path=root, fix="check the folder and --layout; supported files: " + ", ".join(_IMAGE_SUFFIXES))
    _check_unique([c.case_id for c in cases], root)
    return cases


def _detect_layout(root: Path) -> str:
    if (root / "imagesTr").is_dir():
        return "nnunet" if any(p.name.endswith(("_0000.nii.gz", "_0000.nii")) for p in (root / "imagesTr").iterdir()) else "msd"
    if (root / "images").is_dir():
        return "flat"
    if any(_is_image_file(p) for p in root.iterdir()):
        return "flat"
    return "dicom_series" if any(is_dicom_file(p) for p in root.rglob("*") if p.is_file()) else "image_folder"


def _paired_cases(images: Path, labels: Path | None, *, channel_suffix: bool) -> list[CaseSource]:
    by_case: dict[str, list[Path]] = {}
    for path in sorted(p for p in images.iterdir() if _is_image_file(p)):
        stem = case_id_from(path.name)
        if channel_suffix:
            stem = re.sub(r"_\d{4}$", "", stem)
        by_case.setdefault(stem, []).append(path)
    label_files = {case_id_from(p.name): p for p in labels.iterdir() if _is_image_file(p)} if labels and labels.is_dir() else {}
    return [CaseSource(case, tuple(files), label_files.get(case)) for case, files in sorted(by_case.items())]


def _check_unique(ids: Sequence[str], root: Path) -> None:
    seen: set[str] = set()
    for case in ids:
        if case in seen:
            raise InvalidImageError(f"two inputs map to case id {case!r}", path=root, fix="rename one of them.")
        seen.add(case)
