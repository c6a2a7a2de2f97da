"""The plugin's npe2 manifest is valid, installed and names importable commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from npe2 import PluginManager


@pytest.mark.slow  # ~10 s: a fresh interpreter imports napari and every command
def test_npe2_validate_passes_with_imports():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "spadkit", "--imports"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


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
