"""The plugin's npe2 manifest is valid, installed and names importable commands."""

from __future__ import annotations

from npe2 import PluginManager, PluginManifest


def test_npe2_validate_passes_with_imports():
    """What ``npe2 validate spadkit --imports`` checks, in this interpreter (a fresh one costs ~10 s of imports)."""
    manifest = PluginManifest.from_distribution("spadkit")  # validated on load: a bad manifest raises here
    manifest.validate_imports()  # every python_name imports: a missing module or attribute raises ValidationError
    assert manifest.name == "spadkit"


def test_the_installed_manifest_contributes_reader_writer_sample_and_widget():
    manifest = PluginManager.instance().get_manifest("spadkit")
    contributions = manifest.contributions
    assert {"*.nii.gz", "*.nrrd", "*.zarr"} <= set(contributions.readers[0].filename_patterns)
    assert contributions.readers[0].accepts_directories  # DICOM folders and stores
    assert contributions.writers[0].layer_types == ["labels"]
    assert [s.key for s in contributions.sample_data] == ["mni152"]
    [widget] = contributions.widgets
    assert widget.display_name == "Annotate"
    [command] = [c for c in contributions.commands if c.id == widget.command]
    assert command.python_name == "spadkit_napari._widgets:AnnotationWidget"
