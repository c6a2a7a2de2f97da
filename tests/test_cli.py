"""The `spadkit` command line: help, info, catalog, ingest exit codes, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from lightning.pytorch import Callback

from spadkit.cli import build_parser, main
from spadkit.io import OMEZarrStore
from spadkit.tasks.launch import CONFIG_DIR
from tests.conftest import write_nifti_array

SUBCOMMANDS = [[], ["catalog"], ["catalog", "list"], ["catalog", "show"], ["catalog", "validate"], ["ingest"], ["info"], ["check"], ["demo"], ["predict"], ["session"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "spadkit")
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*words, "--help"])
    assert info.value.code == 0
    assert "usage: spadkit" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "spadkit.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("spadkit ")


def test_info_reports_geometry_with_axis_names(mni_t1_path, capsys):
    assert main(["info", str(mni_t1_path)]) == 0
    out = capsys.readouterr().out
    assert "shape        C=1, Z=189, Y=233, X=197" in out
    assert "spacing      Z=1, Y=1, X=1 mm" in out and "orientation  RAS" in out


def test_info_json_on_anisotropic_lps_file(tmp_path, capsys):
    path = write_nifti_array(tmp_path / "ct.nii.gz", np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000, np.diag([-0.7, -0.7, 3.0, 1.0]))
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == {"C": 1, "Z": 6, "Y": 5, "X": 4}
    assert info["spacing_mm"] == pytest.approx({"Z": 3.0, "Y": 0.7, "X": 0.7})
    assert info["orientation"] == "LPS" and info["intensity_range"] == [-1000, -1000 + 119]


def test_info_counts_nonfinite_voxels(tmp_path, capsys):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    assert main(["info", str(write_nifti_array(tmp_path / "nan.nii", data))]) == 0
    assert "1 NaN/Inf voxels" in capsys.readouterr().out


def test_bad_input_exits_2_with_file_and_fix(tmp_path, capsys):
    good = write_nifti_array(tmp_path / "t.nii.gz", np.ones((30, 30, 30), np.float32))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["info", str(cut)]) == 2
    err = capsys.readouterr().err
    assert str(cut) in err and "Fix:" in err and "truncated" in err
    (tmp_path / "notes.xyz").write_text("hello")
    assert main(["info", str(tmp_path / "notes.xyz")]) == 2
    assert "unknown file type" in capsys.readouterr().err


def test_catalog_commands(capsys):
    assert main(["catalog", "validate"]) == 0
    assert "catalog OK" in capsys.readouterr().out
    assert main(["catalog", "list", "--modality", "CT", "--dim", "3"]) == 0
    listing = capsys.readouterr().out
    assert "msd_spleen" in listing and "chexpert" not in listing
    assert main(["catalog", "show", "msd_spleen", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "msd"
    assert main(["catalog", "show", "no_such_set"]) == 2


def test_ingest_exit_code_reports_failed_cases(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    write_nifti_array(tmp_path / "ds" / "ok.nii.gz", np.ones((8, 8, 8), np.int16))
    write_nifti_array(tmp_path / "ds" / "bad.nii.gz", np.full((8, 8, 8), np.inf, np.float32))
    assert main(["ingest", str(tmp_path / "ds"), "--out", str(tmp_path / "o.zarr"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "1 written" in out and "FAILED bad" in out
    assert main(["info", str(tmp_path / "o.zarr")]) == 0
    assert "cases        1: ok" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_builds_store_and_montage(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-pretrain"]) == 0
    store = OMEZarrStore(str(tmp_path / "demo.zarr"))
    assert store.cases() == ["ct_small", "mni152_t1_1mm", "mni152_t1_1x1x3mm_lps"]
    thick = store.read_image("mni152_t1_1x1x3mm_lps")
    assert thick.spacing == pytest.approx((3.0, 1.0, 1.0)) and thick.orientation == "RAS" and thick.modality == "MR"
    assert store.case_attrs("mni152_t1_1x1x3mm_lps")["original_orientation"] == "LPS"
    assert store.read_label("mni152_t1_1mm").classes[2] == "white matter"
    from PIL import Image

    with Image.open(tmp_path / "montage.png") as png:
        assert png.size[0] > 600 and np.asarray(png.convert("L")).std() > 20


def test_pretrain_help_lists_bundled_configs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: spadkit pretrain" in out and "pretrain_tiny" in out and "tokenizer_tiny" in out


def test_pretrain_runs_a_bundled_config_and_exports_weights(tmp_path):
    from spadkit.demo import run_demo
    from spadkit.models import create_model, load_pretrained

    run_demo(tmp_path / "demo")
    export = tmp_path / "weights"
    args = [
        "pretrain", "--config", "tokenizer_tiny", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.train=[{tmp_path / 'demo' / 'demo.zarr'}]",
        f"--model.init_args.export_dir={export}",
    ]  # fmt: skip
    assert main([*args, "--trainer.max_steps=2"]) == 0
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    first_steps = load_pretrained(export)[1].provenance["steps"]
    # resuming reads the real Lightning checkpoint with the forced weights_only=True, and continues
    assert main([*args, "--trainer.max_steps=4", f"--ckpt_path={checkpoint}"]) == 0
    _, cfg = load_pretrained(export)
    assert cfg.architecture == "spad_vt_test" and cfg.provenance["steps"] > first_steps
    assert cfg.provenance["datasets"] == ["demo.zarr"]
    assert cfg.provenance["data"]["intensity"] == "percentile" and "total_stride" in cfg.provenance["data"]["patch_size"]
    assert cfg.intensity.startswith("percentile")
    create_model("spad_vt_test", pretrained=export)


@pytest.mark.parametrize("config", sorted(path.stem for path in CONFIG_DIR.glob("*.yaml")))
def test_every_bundled_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--config", config, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: spadkit.tasks." in printed and "patch_multiple: spad\n" in printed


def test_finetune_runs_the_lightning_launcher_on_a_finetune_config(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--config", "finetune_tiny", "--print_config"])
    assert info.value.code == 0
    assert "class_path: spadkit.tasks.SegFinetune" in capsys.readouterr().out


class RecordingCallback(Callback):
    """A callback outside spadkit, for the import allowlist test."""


def test_config_imports_outside_the_allowlist_need_spadkit_config_imports(tmp_path, capsys, monkeypatch):
    config = tmp_path / "callbacks.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_cli.RecordingCallback\n")
    argv = ["pretrain", "--config", "tokenizer_tiny", "--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and "Importing 'tests.test_cli.RecordingCallback' is not allowed" in capsys.readouterr().err
    monkeypatch.setenv("SPADKIT_CONFIG_IMPORTS", "tests.test_cli")
    with pytest.raises(SystemExit) as allowed:
        main(argv)
    assert allowed.value.code == 0 and "class_path: tests.test_cli.RecordingCallback" in capsys.readouterr().out
    monkeypatch.setenv("SPADKIT_CONFIG_IMPORTS", "jsonargparse")
    assert main(argv) == 2 and "SPADKIT_CONFIG_IMPORTS" in capsys.readouterr().err
