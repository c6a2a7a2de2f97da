"""Full learning, the parent side: start a fine-tune in a separate process, follow it, cancel it, score it.

::

    job = session.start_finetune(max_steps=200)       # returns at once; the GUI keeps running
    job.progress()    # {"state": "running", "step": 35, "max_steps": 200, "loss": 0.61, "message": "step 35/200, ..."}
    job.cancel()      # or, from a GUI timer:
    result = session.poll_finetune()                  # None while running; then a FinetuneResult, once
    result = job.wait()                               # or block until done (scores and swaps too)

The child (:func:`spadkit.active.finetune_worker.run_job`) is a separate process started with
``multiprocessing``'s ``forkserver`` method where the platform has it (``spawn`` elsewhere): never
a fork of the GUI process. The fork server imports torch and the worker once, so later fine-tunes
start in milliseconds. As with any ``spawn``/``forkserver`` process, a *script* that starts a
fine-tune needs the ``if __name__ == "__main__":`` guard (the child imports the main script; notebooks,
napari and the CLI need nothing). The child gets only a job folder::

    SESSION/finetune/<job>/spec.json       what to learn from: store, case, label, version, model folder
    SESSION/finetune/<job>/progress.json   state, step, loss, message (rewritten after every step)
    SESSION/finetune/<job>/log.txt         the child's traceback when it failed
    SESSION/finetune/<job>/weights/        model.pt, pretrained_cfg.json, features.pt, result.json
                                           (appears complete or not at all: renamed from weights.partial/)

Scoring, in the parent when the child is done (:meth:`AnnotationSession.poll_finetune`): the light
head is refitted on the fine-tuned backbone's features (written by the child) on the current
training items, and its Dice on the fixed validation items is compared with the current head's.
The new weights are swapped in only when that Dice is higher; the weights folder then moves to
``SESSION/models/<hash>/`` (``resume`` loads it) and its features into the feature cache. Rejected,
failed and cancelled weights are deleted; the decision is recorded in ``session.json`` either way.
After a swap the session predicts with the light head on the fine-tuned backbone's features (the
sub-second loop is kept); the network's own Dice on the same validation items is recorded beside it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from spadkit.active import finetune_worker as worker
from spadkit.errors import SpadkitError

#: Default AdamW learning rate of the fine-tune (SegFinetune's default).
LR = 1e-3
#: How long a cancelled child gets to exit after SIGTERM before it is killed (s).
CANCEL_GRACE_S = 5.0


@dataclasses.dataclass
class FinetuneResult:
    """What a fine-tune did and what the session decided.

    Attributes:
        accepted: the new weights were swapped in.
        validation_dice_before: the session's validation Dice before (the light head on the old features).
        validation_dice_after: the same with the light head refitted on the fine-tuned backbone's features.
        seconds: wall time of the child, start to finish (s).
        steps: optimiser steps run.
        weights: the folder of the accepted weights (``SESSION/models/<hash>``), None otherwise.
        reason: why it was accepted or not, in words.
        network_validation_dice: the fine-tuned SPAD-UNETR alone on the validation items (for the record).
        job: the job's id (its folder under ``SESSION/finetune/``).
    """

    accepted: bool
    validation_dice_before: float | None
    validation_dice_after: float | None
    seconds: float
    steps: int
    weights: str | None
    reason: str
    network_validation_dice: float | None = None
    job: str = ""


def _context() -> Any:
    """``forkserver`` (preloading the worker) where available, else ``spawn``: never a fork of the caller."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([worker.__name__, *worker.PRELOAD])
        return context
    return multiprocessing.get_context("spawn")


def default_threads() -> int:
    """Torch threads of the child: every core but one (the GUI keeps one), at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


class FinetuneJob:
    """A running (or finished) fine-tune of a session; made by :meth:`AnnotationSession.start_finetune`."""

    def __init__(self, session: Any, folder: Path, max_steps: int, version: int, process: Any):
        self.session, self.folder, self.max_steps, self.process = session, folder, max_steps, process
        self.id, self.version = folder.name, version  # version: the label version it learns from
        self.started = time.perf_counter()
        self.cancelled = False
        self.result: FinetuneResult | None = None

    @property
    def running(self) -> bool:
        return self.process.is_alive()

    def progress(self) -> dict[str, Any]:
        """``{"state", "step", "max_steps", "loss", "message"}``; state is running, done, failed or cancelled."""
        last = worker.read_progress(self.folder)
        out = {"state": "running", "step": 0, "max_steps": self.max_steps, "loss": None, "message": "starting"}
        out.update({k: last[k] for k in out if k in last})
        if self.cancelled:
            out.update(state="cancelled", message="cancelled")
        elif not self.running and out["state"] == "running":
            out.update(state="failed", message=f"the fine-tune process ended (exit code {self.process.exitcode}) before it finished")
        return out

    def cancel(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after :data:`CANCEL_GRACE_S`) and delete its unfinished weights."""
        if self.running:
            self.cancelled = True
            self.process.terminate()
            self.process.join(CANCEL_GRACE_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        remove_weights(self.folder)

    def wait(self, timeout: float | None = None) -> FinetuneResult:
        """Block until the child ends (or ``timeout`` s), then score it and swap it in if better (see the module).

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the job goes on).
        """
        self.process.join(timeout)
        if self.running:
            raise TimeoutError(f"the fine-tune {self.id} is still running after {timeout} s ({self.progress()['message']})")
        if self.result is None:
            self.session.poll_finetune()
        return self.result


def remove_weights(folder: Path) -> None:
    """Delete a job's weights (finished or half-written); its spec, progress and log stay for the record."""
    for name in (worker.PARTIAL, worker.WEIGHTS):
        shutil.rmtree(folder / name, ignore_errors=True)


def clean_stale_jobs(session_folder: Path) -> None:
    """Delete the weights of jobs nobody will score: half-written ones and finished ones whose child and
    starting process have both ended (that session died before polling). Called at session start."""
    for job in (session_folder / "finetune").glob("*"):
        try:
            parent = json.loads((job / worker.SPEC).read_text()).get("parent_pid")
        except (OSError, ValueError):
            parent = None
        child = worker.read_progress(job).get("pid")
        if not any(pid is not None and _alive(int(pid)) for pid in (parent, child)):
            remove_weights(job)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def start(session: Any, *, max_steps: int, device: str | None, lr: float, crop_tokens: int, threads: int | None, seed: int, score_network: bool) -> FinetuneJob:
    """Write the job's spec and start the child (see :meth:`AnnotationSession.start_finetune`)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise SpadkitError(f"max_steps must be a positive integer, got {max_steps!r}", fix="e.g. start_finetune(max_steps=200).")
    if isinstance(crop_tokens, bool) or not isinstance(crop_tokens, int) or crop_tokens < 1:
        raise SpadkitError(f"crop_tokens must be a positive integer, got {crop_tokens!r}", fix="e.g. crop_tokens=4 (64 voxels per axis at 1 mm).")
    train = [i for i in session.items if i.get("split") == "train"]
    validation = [i for i in session.items if i.get("split") == "validation"]
    if not train or not validation:
        raise SpadkitError(
            f"a fine-tune needs training and validation corrections, the session has {len(train)} and {len(validation)}",
            fix="correct at least 3 slices first (the 3rd, 7th, 11th, ... are kept for validation).",
        )
    model_folder = session.folder / "models" / session.backbone_version
    if not (model_folder / "pretrained_cfg.json").is_file():
        raise SpadkitError("the session's model was not saved, so no other process can load it", path=model_folder, fix="use a model made by spadkit.models.create_model.")
    cfg = json.loads((model_folder / "pretrained_cfg.json").read_text())
    worker.unetr_name(str(cfg.get("architecture")))
    if device is not None:
        try:
            torch.device(device)  # a malformed device string fails here, not in the child
        except RuntimeError:
            raise SpadkitError(f"unknown device {device!r}", fix="pass 'cpu', 'cuda' or 'cuda:N' (or None: the GPU when there is one).") from None
    folder = session.folder / "finetune" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    spec = {
        "store": str(session.store.url),
        "case": session.case_id,
        "label": session.label_name,
        "version": session.state_version,
        "num_classes": session.num_classes,
        "model": str(model_folder),
        "validation_items": validation,
        "max_steps": max_steps,
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "lr": lr,
        "crop_tokens": crop_tokens,
        "score_network": bool(score_network),
        "threads": threads or default_threads(),
        "seed": seed,
        "parent_pid": os.getpid(),
    }
    (folder / worker.SPEC).write_text(json.dumps(spec, indent=1))
    process = _context().Process(target=worker.run_job, args=(str(folder),), name=f"spadkit-finetune-{folder.name}", daemon=True)
    process.start()
    return FinetuneJob(session, folder, max_steps, spec["version"], process)


def outcome(job: FinetuneJob) -> tuple[dict[str, Any], Path | None]:
    """The child's ``result.json`` and its weights folder, or (``{"reason": ...}``, None) when it did not finish."""
    state = job.progress()
    weights = job.folder / worker.WEIGHTS
    if state["state"] != "done" or not (weights / worker.RESULT).is_file():
        remove_weights(job.folder)
        return {"reason": f"{state['state']}: {state['message']}", "steps": state["step"]}, None
    return json.loads((weights / worker.RESULT).read_text()), weights
