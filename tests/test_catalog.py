"""The public-dataset catalog: schema, validation, hostile YAML, filters, downloads."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import textwrap
import urllib.request
from pathlib import Path

import pytest
import yaml

from spadkit.catalog import (
    CatalogError,
    default_catalog_dir,
    download,
    load_catalog,
    load_entry,
    schema_json,
    validate_catalog,
)

VALID = textwrap.dedent(
    """\
    name: msd_spleen
    title: Medical Segmentation Decathlon, Task09 Spleen
    modality: [CT]
    body_region: abdomen
    dimensionality: 3
    num_cases: 61
    typical_shape_zyx: null
    typical_spacing_mm_zyx: null
    label_classes: {0: background, 1: spleen}
    task: [segmentation]
    license: CC-BY-SA-4.0
    homepage: http://medicaldecathlon.com/
    download_url: https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar
    access: open
    citation: Antonelli M. et al., The Medical Segmentation Decathlon, Nature Communications 13, 4128 (2022).
    file_format: nifti
    layout: msd
    """
)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_valid_entry_loads_frozen(tmp_path):
    entry = load_entry(_write(tmp_path, "msd_spleen", VALID))
    assert entry.modality_codes == ["CT"] and entry.label_classes == {0: "background", 1: "spleen"}
    with pytest.raises(Exception, match="frozen"):
        entry.num_cases = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("license"), "license: Field required"),
        (lambda d: d.pop("citation"), "citation: Field required"),
        (lambda d: d.update(dimensionality=4), "dimensionality"),
        (lambda d: d.update(modality=["CAT"]), "modality.0"),
        (lambda d: d.update(typical_spacing_mm_zyx=[0, 1, 1]), "spacings must be positive"),
        (lambda d: d.update(homepage="not a url"), "homepage"),
        (lambda d: d.update(unexpected="x"), "Extra inputs are not permitted"),
    ],
)
def test_invalid_entries_name_the_file_and_field(tmp_path, edit, message):
    data = yaml.safe_load(VALID)
    edit(data)
    path = _write(tmp_path, "msd_spleen", yaml.safe_dump(data))
    with pytest.raises(CatalogError, match=message) as info:
        load_entry(path)
    assert str(path) in str(info.value) and "schema.json" in str(info.value)


def test_python_tags_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    hostile = VALID + f"notes: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(CatalogError, match="unsafe YAML construct"):
        load_entry(_write(tmp_path, "msd_spleen", hostile))
    assert not marker.exists()


def test_name_must_match_file(tmp_path):
    with pytest.raises(CatalogError, match="rename the file to msd_spleen.yaml"):
        load_entry(_write(tmp_path, "spleen", VALID))


def test_validate_collects_every_error(tmp_path):
    _write(tmp_path, "msd_spleen", VALID)
    _write(tmp_path, "broken", "name: [unclosed")
    _write(tmp_path, "scalar", "just a string")
    errors = validate_catalog(tmp_path)
    assert sorted(Path(e.path).name for e in errors) == ["broken.yaml", "scalar.yaml"]


def test_unknown_name_suggests_close_matches(tmp_path):
    _write(tmp_path, "msd_spleen", VALID)
    with pytest.raises(CatalogError, match="did you mean msd_spleen"):
        load_catalog(tmp_path)["spleen"]


def test_bundled_catalog_is_valid_large_and_in_sync_with_its_schema():
    folder = default_catalog_dir()
    assert validate_catalog(folder) == []
    catalog = load_catalog(folder)
    assert len(catalog) >= 30
    for required in ("msd_spleen", "msd_brain_tumour", "btcv", "amos22", "totalsegmentator", "lidc_idri", "acdc", "chexpert", "chestxray14", "medmnist"):
        assert required in catalog.entries, required
    assert {m for e in catalog for m in e.modality_codes} >= {"CT", "MR", "PT", "XR", "US"}
    assert {e.dimensionality for e in catalog} == {2, 3}
    on_disk = json.loads((folder / "schema.json").read_text())
    assert on_disk == json.loads(json.dumps(schema_json())), "regenerate data_catalog/schema.json (see data_catalog/README.md)"


def test_filters(tmp_path):
    _write(tmp_path, "msd_spleen", VALID)
    catalog = load_catalog(tmp_path)
    assert [e.name for e in catalog.filter(modality="ct", dimensionality=3, task="segmentation", body_region="Abdo")] == ["msd_spleen"]
    assert catalog.filter(modality="MR") == []


def test_download_verifies_checksum_and_extracts_atomically(tmp_path):
    payload = tmp_path / "src" / "Task99_Toy" / "imagesTr" / "a.nii.gz"
    payload.parent.mkdir(parents=True)
    payload.write_bytes(b"not really nifti")
    archive = tmp_path / "Task99_Toy.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "src" / "Task99_Toy", arcname="Task99_Toy")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    data = yaml.safe_load(VALID) | {"download_url": archive.as_uri(), "download_sha256": digest}
    entry = load_entry(_write(tmp_path / "cat", "msd_spleen", yaml.safe_dump(data)))
    out = download(entry, tmp_path / "downloads")
    assert (out / "Task99_Toy" / "imagesTr" / "a.nii.gz").read_bytes() == b"not really nifti"
    assert not list((tmp_path / "downloads").glob("*.partial"))

    bad = load_entry(_write(tmp_path / "cat2", "msd_spleen", yaml.safe_dump(data | {"download_sha256": "0" * 64})))
    with pytest.raises(CatalogError, match="does not match the catalog's SHA-256"):
        download(bad, tmp_path / "downloads2")
    assert not list((tmp_path / "downloads2").iterdir())


def test_entry_without_public_url_explains_manual_download(tmp_path):
    data = yaml.safe_load(VALID) | {"download_url": None, "access": "registration"}
    entry = load_entry(_write(tmp_path, "msd_spleen", yaml.safe_dump(data)))
    with pytest.raises(CatalogError, match="spadkit ingest FOLDER --catalog msd_spleen"):
        download(entry, tmp_path / "d")


@pytest.mark.parametrize(
    "text, message",
    [
        (b"name: msd_spleen\ntitle: caf\xe9 \xff\n", "not UTF-8"),
        (VALID.encode() + b"num_cases: " + b"9" * 5000 + b"\n", "cannot be read"),
        (b"notes: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    ],
    ids=["latin1", "5000-digit-int", "5000-level-nesting"],
)
def test_unreadable_yaml_gives_catalog_errors(tmp_path, text, message):
    path = tmp_path / "msd_spleen.yaml"
    path.write_bytes(text)
    with pytest.raises(CatalogError, match=message) as info:
        load_entry(path)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


def test_validate_lists_every_bad_file_including_folders_and_bytes(tmp_path):
    _write(tmp_path, "msd_spleen", VALID)
    (tmp_path / "latin1.yaml").write_bytes(b"title: \xff\xfe\n")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000)
    (tmp_path / "huge_int.yaml").write_text("a: " + "7" * 5000)
    (tmp_path / "folder.yaml").mkdir()
    errors = validate_catalog(tmp_path)
    assert sorted(Path(e.path).name for e in errors) == ["deep.yaml", "folder.yaml", "huge_int.yaml", "latin1.yaml"]
    assert "not a regular file" in str(next(e for e in errors if e.path.endswith("folder.yaml")))
    with pytest.raises(CatalogError, match="catalog folder not found"):
        validate_catalog(tmp_path / "missing")


def _entry_with_url(tmp_path: Path, url: str):
    data = yaml.safe_load(VALID) | {"download_url": url}
    return load_entry(_write(tmp_path / "cat", "msd_spleen", yaml.safe_dump(data)))


@pytest.mark.parametrize("tail", ["%2F{outside}%2Fpwned.tar", "..%2F..%2Fpwned.tar", "%2E%2E", "a%5Cb.tar", "%00.tar"])
def test_download_never_writes_outside_dest(tmp_path, tail):
    outside = tmp_path / "outside"
    outside.mkdir()
    tail = tail.format(outside=str(outside).strip("/").replace("/", "%2F"))
    # a real source file where a file:// URL with this tail resolves, so the old code really wrote outside
    source = Path(urllib.request.url2pathname(f"{tmp_path.as_posix()}/src/{tail}"))
    if source.name not in ("", ".", "..") and "\x00" not in str(source):
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"payload")
    entry = _entry_with_url(tmp_path, f"{(tmp_path / 'src').as_uri()}/{tail}")
    dest = tmp_path / "downloads"
    with pytest.raises(CatalogError, match="does not end in a plain file name") as info:
        download(entry, dest, extract=False)
    assert "download_url" in str(info.value)
    assert list(outside.iterdir()) == [] and not (tmp_path / "pwned.tar").exists()


def test_download_name_decodes_the_last_segment():
    from spadkit.catalog import download_name

    assert download_name("https://host/data/Task09%20Spleen.tar?sig=a/b") == "Task09 Spleen.tar"


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    archive = tmp_path / "srv" / "Task99_Toy.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w") as tar:
        good = tarfile.TarInfo("Task99_Toy/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return archive


def _symlink_out() -> tarfile.TarInfo:
    link = tarfile.TarInfo("Task99_Toy/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return link


@pytest.mark.parametrize("member", [lambda: tarfile.TarInfo("../escape.txt"), lambda: tarfile.TarInfo("Task99_Toy/../../escape.txt"), _symlink_out], ids=["dotdot", "inner-dotdot", "symlink"])
def test_escaping_archive_member_is_refused_and_cleaned_up(tmp_path, member):
    info = member()
    archive = _tar_with(tmp_path, info)
    entry = _entry_with_url(tmp_path, archive.as_uri())
    dest = tmp_path / "downloads"
    with pytest.raises(CatalogError, match="archive member .* was refused") as err:
        download(entry, dest)
    assert str(dest / "Task99_Toy.tar") in str(err.value) and repr(info.name) in str(err.value)
    assert sorted(p.name for p in dest.iterdir()) == ["Task99_Toy.tar"]  # no msd_spleen.partial/ left behind
    assert not (tmp_path / "escape.txt").exists()


def test_damaged_archive_is_a_catalog_error(tmp_path):
    archive = tmp_path / "srv" / "Task99_Toy.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(Path(__file__), arcname="Task99_Toy/a.py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    dest = tmp_path / "downloads"
    with pytest.raises(CatalogError, match="cannot extract the archive"):
        download(_entry_with_url(tmp_path, archive.as_uri()), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["Task99_Toy.tar.gz"]
