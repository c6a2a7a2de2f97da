"""Every shell command in README.md is run somewhere, so the README cannot go stale.

Each command of a ```bash / ```sh / ```shell / ```console block (comments stripped; in console
blocks the lines starting with ``$ ``) must be in exactly one registry below:

* :data:`RUN_HERE`: fast commands this file runs itself (in-process ``spadkit``), with README
  placeholders (``scan.nii.gz``, ``store.zarr``, ``ds/``) replaced by real files made here;
* :data:`COVERED_BY`: command -> (pytest node id of the test that runs it, or the same on test
  data, and what that test runs); the node must exist;
* :data:`MAKE_TARGETS`: ``make`` lines, checked against the Makefile (``make demo`` also runs
  ``spadkit demo``, whose quick variant a test runs).

A README command in none of them fails :func:`test_every_readme_command_is_run_somewhere` with
the line to add; an entry whose command left the README fails :func:`test_no_stale_entries`.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}

#: Commands this file runs (see :func:`test_fast_readme_commands_run`): README text -> expected exit status.
RUN_HERE: dict[str, int] = {
    "spadkit info scan.nii.gz": 0,
    "spadkit info scan.nii.gz --json": 0,
    "spadkit info store.zarr": 0,
    "spadkit catalog list --modality CT --dim 3 --task segmentation": 0,
    "spadkit catalog show msd_spleen [--json]": 0,
    "spadkit catalog validate": 0,
    "spadkit ingest ds/ --out ds.zarr --workers 8": 0,
    "spadkit ingest ds/ --out ds.zarr --repair": 0,
    "spadkit check store.zarr": 0,
    "spadkit check store.zarr --quick": 0,
    "spadkit pretrain --config pretrain_tiny --print_config": 0,
}

PARSES = "tests/test_cli.py::test_every_bundled_config_parses"
SESSION = "tests/active/test_command.py::test_a_session_runs_step_by_step_from_the_shell"
DEMO_QUICK = "tests/test_demo_report.py::test_quick_demo_writes_a_report_of_every_step"
PREDICT = "tests/test_predict_command.py"

#: README command -> (node id of the test that runs it, what that test runs). Add new README commands here.
COVERED_BY: dict[str, tuple[str, str]] = {
    # ---- data, ingest
    "spadkit info dicom_series_folder/": ("tests/test_io_readers.py::test_dicom_series_sorted_by_position", "reads a DICOM series folder as `info` does (read_volume), not the CLI"),
    "spadkit ingest Task09_Spleen/ --catalog msd_spleen --out spleen.zarr": ("tests/test_ingest.py::test_msd_layout_is_ingested_with_channels_labels_and_ras", "ingests an MSD-layout folder with a catalog entry (Python API, toy data)"),
    "spadkit ingest ds/ --out ds.zarr --scheduler tcp://10.0.0.1:8786": ("tests/test_ingest.py::test_distributed_scheduler_address", "ingests through a dask.distributed LocalCluster's address"),
    "python -m spadkit.data.synth 24 synth.zarr": ("tests/data/test_synth.py::test_synthetic_cases_vary_in_contrast_and_spacing_and_reach_a_store", "write_synthetic_store with 2 cases (the function behind the module's command line)"),
    # ---- pretraining
    "spadkit pretrain --config tokenizer_tiny": ("tests/test_cli.py::test_pretrain_runs_a_bundled_config_and_exports_weights", "tokenizer_tiny on the demo store, 2 + 2 steps with resume"),
    "spadkit pretrain --config pretrain_tiny": ("tests/test_demo_report.py::test_quick_demo_writes_a_report_of_every_step", "the demo's pretrain_tiny run (10 steps)"),
    "spadkit pretrain --config pretrain_pumit --model.init_args.tokenizer weights/spad_vt": (f"{PARSES}[pretrain_pumit]", "parses the config (ViT-B training is not run in the tests)"),
    "spadkit pretrain --config pretrain_gpu --model.init_args.tokenizer weights/spad_vt": (f"{PARSES}[pretrain_gpu]", "parses the config (no GPU in CI)"),
    "torchrun --nproc_per_node 8 -m spadkit.cli pretrain --config pretrain_ddp": (f"{PARSES}[pretrain_ddp]", "parses the config; tests/data/test_ddp.py runs 2 gloo ranks of the stream"),
    "spadkit pretrain --config tokenizer_tiny --data.train='[synth.zarr, demo_output/demo.zarr]' --trainer.max_steps=4000": ("tests/test_cli.py::test_pretrain_runs_a_bundled_config_and_exports_weights", "tokenizer_tiny with --data.train and --trainer.max_steps overridden"),
    "spadkit pretrain --config pretrain_tiny --data.train='[synth.zarr]'": ("tests/test_demo_report.py::test_quick_demo_writes_a_report_of_every_step", "pretrain_tiny with --data.train overridden (the demo store); the tokenizer check refuses MIM"),
    "spadkit pretrain --config pretrain_mae": (f"{PARSES}[pretrain_mae]", "parses the config"),
    "torchrun --nproc_per_node 8 -m spadkit.cli pretrain --config pretrain_fsdp": (f"{PARSES}[pretrain_fsdp]", "parses the config (no multi-GPU run in CI)"),
    "python benchmarks/feature_probe.py --weights demo_output/weights/spad_vit_test --out probe.json": ("tests/test_feature_probe.py::test_cli_writes_runs_and_plot", "the script's main() at 4 mm with the random and histogram arms"),
    ".venv/bin/python benchmarks/feature_probe.py --weights demo_output/weights/spad_vit_test --out benchmarks/results/feature_probe.json": ("tests/test_feature_probe.py::test_cli_writes_runs_and_plot", "the script's main() at 4 mm with the random and histogram arms"),
    # ---- fine-tuning
    "spadkit finetune --config finetune_tiny": ("tests/tasks/test_finetune.py::test_finetune_config_trains_from_a_store_and_exports_a_predictor", "finetune_tiny through the same LightningCLI launcher, 2 steps on a labelled MNI152 store"),
    "spadkit finetune --config finetune_gpu --model.init_args.num_classes 14 --data.train '[{store: ct.zarr, label: seg}]'": ("tests/tasks/test_finetune.py::test_bundled_finetune_configs_parse[finetune_gpu]", "parses the config (no GPU in CI)"),
    "torchrun --nproc_per_node 4 -m spadkit.cli finetune --config finetune_ddp": ("tests/tasks/test_finetune.py::test_bundled_finetune_configs_parse[finetune_ddp]", "parses the config (no multi-GPU run in CI)"),
    ".venv/bin/python benchmarks/label_efficiency.py --weights demo_output/weights/spad_vit_test --out benchmarks/results/label_efficiency.json": ("tests/test_label_efficiency.py::test_cli_writes_the_schema_and_plot", "the script's main() with --quick and all five arms (random-init weights made in the test)"),
    ".venv/bin/python benchmarks/label_efficiency.py --quick --weights DIR --out /tmp/le.json": ("tests/test_label_efficiency.py::test_cli_writes_the_schema_and_plot", "the script's main() with --quick"),
    ".venv/bin/python benchmarks/label_efficiency.py --quick --shuffle-labels --weights DIR --out /tmp/le_shuffled.json": ("tests/test_label_efficiency.py::test_random_forest_can_lose", "the forest with shuffled labels falls to chance (the arm function, not the script)"),
    # ---- prediction
    "spadkit predict store.zarr/CASE --model runs/finetune/export": (f"{PREDICT}::test_predict_a_store_case_writes_label_groups_with_provenance", "a store case with a fine-tune export"),
    "spadkit predict t1.nii.gz --model last.ckpt --out predictions/": (f"{PREDICT}::test_predict_a_nifti_file_from_a_lightning_checkpoint", "a NIfTI file with a Lightning checkpoint and --out"),
    "spadkit predict store.zarr/CASE --model runs/finetune/export --region 40:48": ("tests/test_predict_region.py::test_predict_command_region_refreshes_a_slab", "a 1x1x3 mm MNI152 store, --region over the latest saved prediction"),
    "spadkit predict store.zarr/CASE --model runs/finetune/export --region 40:48,:,10:90 --base-version 1": ("tests/test_predict_region.py::test_predict_command_region_refreshes_a_slab", "--region Z0:Z1,Y0:Y1,X0:X1 with --base-version"),
    "spadkit predict store.zarr/CASE --model export/ --flips": ("tests/test_infer.py::test_flip_tta_averages_flipped_predictions", "flip TTA through spadkit.infer.predict (not the --flips flag of the command)"),
    "spadkit predict store.zarr/CASE --model export/ --mc-dropout 0.1 --mc-samples 8": (f"{PREDICT}::test_monte_carlo_dropout_from_the_command_line", "--mc-dropout 0.2 --mc-samples 3"),
    # ---- the annotation loop
    "spadkit session store.zarr CASE suggest --model spad_vit_small": (SESSION, "suggest, submit, undo, redo, history on the MNI152 at 2 mm (spad_vit_test)"),
    "spadkit session store.zarr CASE submit --axis z --index 90 --mask slice.npy": (SESSION, "submit of a .npy mask"),
    "spadkit session store.zarr CASE undo": (SESSION, "undo, redo and history"),
    "spadkit session store.zarr CASE finetune --finetune-steps 200": ("tests/active/test_command.py::test_a_full_finetune_runs_headless_from_the_shell", "finetune with a few steps on the MNI152 at 2 mm"),
    ".venv/bin/spadkit session demo_output/demo.zarr mni152_t1_1mm suggest --label demo_gm": (SESSION, "suggest on a resumed session (the demo's store and label in README)"),
    "spadkit demo --quick": (DEMO_QUICK, "the demo with Budget.quick() (what --quick selects)"),
    "spadkit session brains.zarr mni suggest --model spad_vit_small": (SESSION, "suggest with a registered model name"),
    "spadkit session brains.zarr mni submit --axis z --index 68 --mask slice68.npy": (SESSION, "submit of a .npy mask"),
    "spadkit session brains.zarr mni undo": (SESSION, "undo"),
    # ---- front-ends
    "napari --plugin spadkit demo_output/demo.zarr/mni152_t1_1mm": ("tests/napari/test_reader.py::test_views_are_radiological", "opens a store case with the spadkit reader in a real viewer under Xvfb"),
    ".venv/bin/napari --plugin spadkit demo_output/demo.zarr/mni152_t1_1mm": ("tests/napari/test_reader.py::test_views_are_radiological", "opens a store case with the spadkit reader in a real viewer under Xvfb"),
    "napari --plugin spadkit scan.nii.gz": ("tests/napari/test_reader.py::test_nrrd_and_dicom_files_open_in_ras_at_their_spacing", "the spadkit reader on NRRD and DICOM files"),
    ".venv/bin/jupyter lab notebooks/": ("tests/test_notebook_browser.py::test_run_all_cells_in_jupyterlab_shows_the_slice_viewer", "a real JupyterLab server on notebooks/ in headless Chromium, Run All Cells"),
}

#: ``make`` lines: the target must exist in the Makefile.
MAKE_TARGETS = {"make demo", "make test", "make venv"}
#: ``make demo`` runs ``spadkit demo``; this test runs its quick variant through spadkit.demo.main.
DEMO_TEST = "tests/test_demo_report.py::test_quick_demo_writes_a_report_of_every_step"


@dataclass(frozen=True)
class Command:
    line: int
    text: str


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[Command]:
    """Every command of the shell code blocks of a Markdown text (continuation lines joined)."""
    commands, block, pending = [], None, ""
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence:
            block = None if block is not None else fence.group(1).lower()
            continue
        if block not in SHELL_BLOCKS:
            continue
        if block == "console":
            if not line.startswith("$ ") and not pending:
                continue
            line = line.removeprefix("$ ")
        command = pending + strip_comment(line).strip()
        if command.endswith("\\"):
            pending = command[:-1] + " "
            continue
        pending = ""
        if command:
            commands.append(Command(number, " ".join(command.split())))
    return commands


def how_to_map(command: Command) -> str:
    return (
        f"README.md:{command.line}: `{command.text}` is run by no test. Map it in tests/test_readme_commands.py: add\n"
        f'    "{command.text}": ("tests/<file>.py::<test that runs it>", "what that test runs"),\n'
        "to COVERED_BY, or add it to RUN_HERE if that file can run it in seconds (README paths: see the placeholders fixture)."
    )


def test_the_parser_finds_commands_and_drops_comments():
    text = "x\n```bash\nspadkit info a.nii  # what\n# only a comment\nspadkit \\\n  check s.zarr\n```\n```python\nprint(1)\n```\n```console\n$ make demo\noutput\n```\n"
    assert [c.text for c in readme_commands(text)] == ["spadkit info a.nii", "spadkit check s.zarr", "make demo"]
    assert strip_comment("spadkit pretrain --data.train='[a#b]'  # c") == "spadkit pretrain --data.train='[a#b]'"


def unmapped(text: str) -> list[str]:
    """How to map each command of a README text that no registry holds."""
    registered = set(RUN_HERE) | set(COVERED_BY) | MAKE_TARGETS
    return [how_to_map(c) for c in readme_commands(text) if c.text not in registered]


def test_every_readme_command_is_run_somewhere():
    missing = unmapped(README.read_text())
    assert not missing, "\n\n".join(missing)


def test_a_new_command_is_reported_with_how_to_map_it():
    (message,) = unmapped("```bash\nmake demo\nspadkit predict store.zarr CASE   # new\n```\n")
    assert message.startswith("README.md:3: `spadkit predict store.zarr CASE` is run by no test") and "COVERED_BY" in message


def test_no_stale_entries():
    in_readme = {c.text for c in readme_commands(README.read_text())}
    stale = sorted((set(RUN_HERE) | set(COVERED_BY) | MAKE_TARGETS) - in_readme)
    overlap = sorted((set(RUN_HERE) & set(COVERED_BY)) | (MAKE_TARGETS & (set(RUN_HERE) | set(COVERED_BY))))
    assert not stale, f"no longer in README.md, remove from tests/test_readme_commands.py: {stale}"
    assert not overlap, f"in two registries: {overlap}"


def _test_names(path: Path) -> set[str]:
    """``name`` and ``Class::name`` of every test function in a file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
    return names


@pytest.mark.parametrize("node", sorted({node for node, _ in COVERED_BY.values()} | {DEMO_TEST}))
def test_mapped_tests_exist(node):
    file, _, name = node.partition("::")
    path = ROOT / file
    assert path.is_file(), f"{node}: no such test file"
    assert name.split("[")[0] in _test_names(path), f"{node}: no such test in {file} (renamed? update COVERED_BY)"


@pytest.mark.slow
def test_mapped_parametrized_ids_are_collected():
    """The ``[id]`` parts of the mapped node ids exist (pytest collects exactly them)."""
    nodes = sorted({node for node, _ in COVERED_BY.values() if "[" in node})
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *nodes], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(node in result.stdout for node in nodes), result.stdout[-3000:]


def test_make_targets_exist_and_make_demo_runs_the_demo():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    assert {t.split()[1] for t in MAKE_TARGETS} <= targets
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE).group(1)
    assert "spadkit demo" in recipe, f"`make demo` no longer runs `spadkit demo`: {DEMO_TEST} no longer covers it"


# ---------------------------------------------------------------------- the commands run here
@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory, mni_t1_path: Path) -> dict[str, str]:
    """README placeholder -> a real path: the MNI152 T1 file, a tiny dataset folder, a store ingested from it."""
    from spadkit.ingest import ingest
    from tests.conftest import write_nifti_array

    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    (root / "ds").mkdir()
    for name in ("a", "b"):
        write_nifti_array(root / "ds" / f"{name}.nii.gz", rng.integers(0, 1000, (24, 20, 16)).astype(np.int16))
    ingest(root / "ds", str(root / "store.zarr"), progress=False)
    return {"scan.nii.gz": str(mni_t1_path), "store.zarr": str(root / "store.zarr"), "ds/": str(root / "ds"), "ds.zarr": str(root / "ds.zarr")}


def variants(command: str) -> list[str]:
    """A command with README's ``[--flag]`` notation expanded: without and with the optional part."""
    match = re.search(r"\s*\[([^\]]+)\]", command)
    if not match:
        return [command]
    return variants(command[: match.start()] + command[match.end() :]) + variants(command[: match.start()] + " " + match.group(1) + command[match.end() :])


@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_fast_readme_commands_run(command, placeholders, capsys):
    from spadkit.cli import main

    for text in variants(command):
        words = [placeholders.get(w, w) for w in text.split()]
        assert words[0] == "spadkit", f"RUN_HERE runs spadkit commands in-process; move `{text}` to COVERED_BY"
        try:
            code = main(words[1:])
        except SystemExit as exit_:  # LightningCLI's --print_config exits
            code = exit_.code
        out = capsys.readouterr()
        assert code == RUN_HERE[command], f"`{text}` exited {code}:\n{out.out[-2000:]}\n{out.err[-2000:]}"
