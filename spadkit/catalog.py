"""The data catalog: one YAML file per public dataset, validated into frozen models.

The YAML files live in ``data_catalog/`` at the repository root (and are
installed inside the package as ``spadkit/data_catalog``). Each file describes
one dataset; :class:`DatasetEntry` is the schema and ``data_catalog/schema.json``
is its JSON-Schema export, kept in sync by the tests.

Facts in the catalog must be true: a field that is not known is ``null``
rather than guessed.

Example:
    >>> from spadkit.catalog import load_catalog
    >>> catalog = load_catalog()
    >>> [e.name for e in catalog.filter(modality="CT")][:3]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AnyUrl, BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm.auto import tqdm

from spadkit.errors import CatalogError, SpadkitError

#: Environment variable that points spadkit at another catalog folder.
CATALOG_ENV = "SPADKIT_CATALOG"
#: Largest catalog file read (bytes); entries are a few KB.
MAX_ENTRY_BYTES = 1 << 20


class Modality(str, Enum):
    """Imaging modalities, using DICOM modality codes where one exists."""

    CT = "CT"
    MR = "MR"
    PT = "PT"  # PET
    NM = "NM"  # SPECT / nuclear medicine
    XR = "XR"  # projection radiography (DICOM CR/DX)
    MG = "MG"  # mammography
    US = "US"
    OCT = "OCT"
    ENDOSCOPY = "ENDOSCOPY"
    DERMOSCOPY = "DERMOSCOPY"
    FUNDUS = "FUNDUS"
    MICROSCOPY = "MICROSCOPY"


class Task(str, Enum):
    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    REGRESSION = "regression"
    NONE = "none"


PositiveTriple = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]


class DatasetEntry(BaseModel):
    """One public dataset.

    Shapes and spacings use spadkit's axis order ``(Z, Y, X)``; a 2D dataset has
    ``Z == 1`` and a ``null`` depth spacing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$", description="Unique id, the file stem.")
    title: str = Field(min_length=3, description="Human-readable title.")
    modality: list[Modality] = Field(min_length=1, description="Modalities, one per image channel where the dataset is multi-channel.")
    body_region: str = Field(min_length=2, description="Anatomy covered, e.g. 'abdomen', 'brain', 'chest'.")
    dimensionality: Literal[2, 3] = Field(description="2 for planar images, 3 for volumes.")
    num_cases: int | None = Field(ge=1, description="Number of images/volumes (all public splits), null when unknown.")
    typical_shape_zyx: list[int] | None = Field(
        default=None, min_length=3, max_length=3, description="Typical shape in voxels (Z, Y, X); Z=1 for 2D."
    )
    typical_spacing_mm_zyx: list[float | None] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description="Typical voxel spacing in mm (Z, Y, X); Z is null for 2D; the whole field null when unknown.",
    )
    label_classes: dict[int, str] | None = Field(description="Label value -> class name (segmentation) or class index -> name; null if unlabelled.")
    task: list[Task] = Field(min_length=1, description="Tasks the public labels support ('none' if unlabelled).")
    license: str | None = Field(description="SPDX id where one exists, else the license's name; null when unclear.")
    homepage: AnyUrl = Field(description="Where the dataset is described.")
    download_url: AnyUrl | None = Field(description="Direct public download URL (no login), else null.")
    download_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the download, if published.")
    access: Literal["open", "registration", "data-use-agreement"] = Field(description="What a user must do to get the data.")
    citation: str = Field(min_length=10, description="Reference to cite (authors, title, venue, year).")
    file_format: Literal["nifti", "dicom", "nrrd", "mha", "png", "jpeg", "tiff", "npz"] = Field(description="Format of the images as distributed.")
    layout: Literal["msd", "nnunet", "flat", "dicom_series", "image_folder", "other"] = Field(
        description="Folder layout after extraction, which `spadkit ingest` uses to pair images and labels."
    )
    notes: str | None = Field(default=None, description="Anything a user should know (splits, versions, caveats).")
    annotation_levels: list[Literal["mask", "box", "class", "none"]] | None = Field(
        default=None,
        min_length=1,
        description="Levels of the public annotations: 'mask' (voxel label maps), 'box' (bounding boxes), 'class' "
        "(image-level classes), or ['none']; some cases may have only some of them. Null: derived from task.",
    )

    @field_validator("typical_spacing_mm_zyx")
    @classmethod
    def _spacing_positive(cls, value: list[float | None] | None) -> list[float | None] | None:
        if value is not None and any(v is not None and v <= 0 for v in value):
            raise ValueError("spacings must be positive (mm)")
        return value

    @field_validator("annotation_levels")
    @classmethod
    def _levels_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(set(value)) != len(value) or ("none" in value and len(value) > 1)):
            raise ValueError("list each level once; 'none' stands alone")
        return value

    @property
    def modality_codes(self) -> list[str]:
        return [m.value for m in self.modality]

    @property
    def levels(self) -> tuple[str, ...]:
        """The annotation levels (:data:`spadkit.io.annotations.LEVELS` order), or ``("none",)``:
        ``annotation_levels`` where given, else from ``task`` (segmentation: mask, detection: box,
        classification: class; regression and none add no level)."""
        from spadkit.io.annotations import LEVELS  # here: listing the catalog needs no store stack

        given = self.annotation_levels or [_TASK_LEVELS[t] for t in self.task if t in _TASK_LEVELS]
        return tuple(level for level in LEVELS if level in given) or ("none",)


_TASK_LEVELS = {Task.SEGMENTATION: "mask", Task.DETECTION: "box", Task.CLASSIFICATION: "class"}


@dataclass(frozen=True)
class Catalog:
    """All entries of a catalog folder, by name."""

    entries: dict[str, DatasetEntry]
    folder: Path

    def __iter__(self) -> Iterator[DatasetEntry]:
        return iter(self.entries[name] for name in sorted(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> DatasetEntry:
        try:
            return self.entries[name]
        except KeyError:
            close = [n for n in sorted(self.entries) if name.lower() in n]
            hint = f"did you mean {', '.join(close[:5])}?" if close else "run `spadkit catalog list` to see the names."
            raise CatalogError(f"no dataset named {name!r} in the catalog", path=self.folder, fix=hint) from None

    def filter(
        self,
        modality: str | None = None,
        dimensionality: int | None = None,
        task: str | None = None,
        body_region: str | None = None,
    ) -> list[DatasetEntry]:
        """Entries matching every given criterion (case-insensitive)."""
        out = []
        for entry in self:
            if modality and modality.upper() not in entry.modality_codes:
                continue
            if dimensionality and entry.dimensionality != dimensionality:
                continue
            if task and task.lower() not in [t.value for t in entry.task]:
                continue
            if body_region and body_region.lower() not in entry.body_region.lower():
                continue
            out.append(entry)
        return out


def default_catalog_dir() -> Path:
    """The catalog folder: ``$SPADKIT_CATALOG``, else the repo's ``data_catalog/``, else the installed copy."""
    if os.environ.get(CATALOG_ENV):
        return Path(os.environ[CATALOG_ENV])
    repo_copy = Path(__file__).resolve().parent.parent / "data_catalog"
    if repo_copy.is_dir():
        return repo_copy
    return Path(__file__).resolve().parent / "data_catalog"


def load_entry(path: str | os.PathLike) -> DatasetEntry:
    """Read and validate one catalog YAML file.

    Raises:
        CatalogError: unreadable YAML, a Python tag or other unsafe construct,
            a missing/invalid field, or a ``name`` that differs from the file stem.
    """
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise CatalogError("expected a mapping of fields at the top level", path=path, fix="see data_catalog/schema.json.")
    try:
        entry = DatasetEntry.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<entry>'}: {e['msg']}" for e in err.errors())
        raise CatalogError(f"invalid catalog entry: {problems}", path=path, fix="see data_catalog/schema.json for the fields.") from None
    if entry.name != path.stem:
        raise CatalogError(
            f"name {entry.name!r} differs from the file name {path.stem!r}",
            path=path,
            fix=f"rename the file to {entry.name}.yaml or set name: {path.stem}.",
        )
    return entry


def read_yaml(path: str | os.PathLike, error: type[SpadkitError] = CatalogError, max_bytes: int = MAX_ENTRY_BYTES) -> object:
    """``yaml.safe_load`` of a small YAML file (catalog entry, training config) with every failure an ``error`` naming it.

    Raises:
        error: not a regular file, larger than ``max_bytes``, not UTF-8, a Python tag or other
            unsafe construct, invalid YAML, an integer too long to convert, or nesting too deep.
    """
    path = Path(path)
    if not path.is_file():
        raise error("not a regular file" if path.exists() else "file not found", path=path, fix="pass an existing YAML file.")
    if path.stat().st_size > max_bytes:
        raise error(f"{path.stat().st_size} bytes is more than this YAML file may hold ({max_bytes})", path=path, fix="keep it to plain settings of a few KB.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"not UTF-8 text (byte {err.start})", path=path, fix="save the file as UTF-8.") from None
    except yaml.constructor.ConstructorError as err:
        raise error(f"refused an unsafe YAML construct ({err.problem})", path=path, fix="YAML here is plain data: remove tags such as !!python/object.") from None
    except yaml.YAMLError as err:
        raise error(f"not valid YAML: {err}", path=path, fix="fix the YAML syntax.") from None
    except ValueError as err:  # an integer with more digits than Python converts (4300)
        raise error(f"a value cannot be read ({' '.join(str(err).split())[:120]})", path=path, fix="use a number of sensible size.") from None
    except RecursionError:
        raise error("nested too deeply to read", path=path, fix="use a flat mapping of settings.") from None


def load_catalog(folder: str | os.PathLike | None = None) -> Catalog:
    """Load every ``*.yaml`` entry of a catalog folder (the default one if ``None``)."""
    folder = Path(folder) if folder is not None else default_catalog_dir()
    if not folder.is_dir():
        raise CatalogError("catalog folder not found", path=folder, fix=f"pass an existing folder or set ${CATALOG_ENV}.")
    entries = {}
    for path in sorted(folder.glob("*.yaml")):
        entry = load_entry(path)
        entries[entry.name] = entry
    return Catalog(entries=entries, folder=folder)


def validate_catalog(folder: str | os.PathLike | None = None) -> list[CatalogError]:
    """Validate every ``*.yaml`` of a catalog folder; return all the errors instead of stopping at the first.

    Raises:
        CatalogError: the folder itself does not exist.
    """
    folder = Path(folder) if folder is not None else default_catalog_dir()
    if not folder.is_dir():
        raise CatalogError("catalog folder not found", path=folder, fix=f"pass an existing folder or set ${CATALOG_ENV}.")
    errors = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            load_entry(path)
        except CatalogError as err:
            errors.append(err)
    return errors


def schema_json() -> dict:
    """JSON Schema of a catalog entry (what ``data_catalog/schema.json`` holds)."""
    return DatasetEntry.model_json_schema()


# --------------------------------------------------------------------------- downloads


def download(entry: DatasetEntry, dest: str | os.PathLike, *, extract: bool = True, chunk_mb: int = 4) -> Path:
    """Download a dataset with a public URL into ``dest`` and optionally extract it.

    The file is written to ``<name>.partial`` and renamed only once complete and
    (when the catalog gives one) its SHA-256 matches, so an interrupted download
    is never mistaken for a finished one. An existing complete file is reused.

    Args:
        entry: catalog entry with a ``download_url``.
        dest: folder to download into (created if needed).
        extract: unpack ``.tar``, ``.tar.gz``/``.tgz`` and ``.zip`` archives into ``dest``.
        chunk_mb: read size in MiB.

    Returns:
        The extracted folder, or the downloaded file when not extracted.

    Everything is written under ``dest``: the file name is the URL's last path
    segment, decoded, and refused when it holds a separator or is a dot name
    (:func:`download_name`); archive members that would escape are refused.

    Raises:
        CatalogError: no public URL, a URL without a plain file name, a failed download,
            a checksum mismatch, or a damaged archive or escaping member (nothing partial
            is left behind).
    """
    if entry.download_url is None:
        raise CatalogError(
            f"{entry.name} has no public download URL (access: {entry.access})",
            path=str(entry.homepage),
            fix="download it from the homepage by hand, then run `spadkit ingest FOLDER --catalog "
            f"{entry.name} --out STORE.zarr`.",
        )
    dest = Path(dest)
    url = str(entry.download_url)
    target = dest / download_name(url)
    dest.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        try:
            _fetch(url, partial, entry.name, chunk_mb)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError)):
                raise CatalogError(f"download failed ({err})", path=url, fix="check the network and the URL, then retry.") from None
            raise
        if entry.download_sha256 and _sha256(partial) != entry.download_sha256:
            partial.unlink()
            raise CatalogError(
                "downloaded file does not match the catalog's SHA-256",
                path=url,
                fix="retry the download; if it persists the file changed upstream: update download_sha256.",
            )
        partial.replace(target)
    if not extract:
        return target
    return _extract(target, dest / entry.name)


def _fetch(url: str, partial: Path, desc: str, chunk_mb: int) -> None:
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
            while block := response.read(chunk_mb << 20):
                out.write(block)
                bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())


def download_name(url: str) -> str:
    """The file name a download is saved under: the URL path's last segment, percent-decoded.

    Raises:
        CatalogError: the decoded name is empty, ``.``/``..``, or contains a path separator
            (``%2F``-encoded paths would otherwise write outside the destination).
    """
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if name in ("", ".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise CatalogError(
            f"the download URL does not end in a plain file name (decoded: {name!r})",
            path=url,
            fix="set download_url to a URL whose last path segment is the archive's file name.",
        )
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _extract(archive: Path, folder: Path) -> Path:
    """Unpack an archive into ``folder`` (via a temporary sibling, renamed when done).

    Members that would land outside ``folder`` (absolute paths, ``..``, links
    pointing out, devices) are refused; the temporary folder is then removed.

    Raises:
        CatalogError: not an archive, a damaged archive, or a member that escapes; names the
            archive and the member.
    """
    if folder.exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unpack(archive, tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-extracted NAME.partial/ behind
        if isinstance(err, tarfile.FilterError):
            raise CatalogError(
                f"archive member {err.tarinfo.name!r} was refused ({err})", path=archive, fix="do not extract this archive; it tries to write outside its folder."
            ) from None
        if isinstance(err, (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error)):
            raise CatalogError(f"cannot extract the archive ({type(err).__name__}: {err})", path=archive, fix="delete it and download again.") from None
        raise
    tmp.replace(folder)
    return folder


def _unpack(archive: Path, tmp: Path) -> None:
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # "data" rejects absolute paths, links out and devices
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _check_zip_members(zf.namelist(), archive)
            zf.extractall(tmp)
    else:
        raise CatalogError("downloaded file is neither a tar nor a zip archive", path=archive, fix="pass extract=False and unpack it yourself.")


def _check_zip_members(names: Sequence[str], archive: Path) -> None:
    for name in names:
        if name.startswith(("/", "\\")) or ".." in Path(name).parts:
            raise CatalogError(f"archive member {name!r} would escape the target folder", path=archive, fix="do not extract this archive.")
