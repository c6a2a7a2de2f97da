"""`torchrun` launches `spadkit pretrain` on two CPU ranks (gloo): the scale-out path of the README, run for real."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spadkit.models import create_model, load_pretrained


@pytest.mark.slow
def test_torchrun_runs_the_cli_on_two_ranks_and_exports_once(mni_store, tmp_path):
    store, _ = mni_store
    export = tmp_path / "export"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "spadkit.cli", "pretrain", "--config", "pretrain_mae",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.train=[{store}]",
        "--data.samples_per_case", "2", f"--model.init_args.export_dir={export}",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # Lightning joined both torchrun ranks
    model = create_model("spad_vit_test", pretrained=export)  # one complete export, readable
    assert load_pretrained(export)[1].architecture == "spad_vit_test"
    assert sum(p.numel() for p in model.parameters()) > 0
    assert sorted(p.name for p in export.iterdir()) == ["model.pt", "pretrained_cfg.json"]
