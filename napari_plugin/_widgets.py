"""The annotation dock widget: predict, correct with napari's label tools, learn, go to the next slice.

*Plugins > spadkit > Annotate*. The widget is thin: it reads its fields, calls
:class:`spadkit.active.AnnotationSession` and updates layers
(:mod:`spadkit_napari._annotation`). A person

1. picks a store, a case, a label map and a model, and clicks **Open session**
   (a session saved in the store for that case and label map is resumed with its own model);
2. clicks **Predict** (the slice on screen or the whole volume): the layers
   ``<case> probability``, ``<case> uncertainty`` and ``<label> (session)`` fill in;
3. corrects ``<label> (session)`` on the slice on screen with napari's own paint,
   fill and erase tools, and clicks **Learn**: that slice (the viewer's current dims)
   of the chosen labels layer is submitted, saved as a new label version, the light
   head refits and the prediction on screen updates; with the fine-tune box ticked a
   full fine-tune of the backbone then runs in a separate process, with progress and
   cancel, and its weights are swapped in when better on the validation slices;
4. clicks **Next slice**: the viewer moves to the suggested slice, predicted, and the
   widget says why; **Undo**/**Redo** and the history table (edit Dice per round) follow.

Every session call runs in a napari thread worker, one at a time (the buttons wait
meanwhile), and the fine-tune's progress is polled by a timer, so the viewer never
freezes (measured with :class:`spadkit_napari._stall.StallProbe` in the tests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import napari
import numpy as np
import torch
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from napari.layers import Image, Labels, Layer
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from torch import nn

from spadkit.active import AnnotationSession, Round
from spadkit.active.features_cache import session_dir
from spadkit.active.history import AXIS_NAMES
from spadkit.active.session import load_saved_model
from spadkit.errors import SpadkitError
from spadkit.io import OMEZarrStore
from spadkit.models import create_model, list_models

from ._annotation import (
    HISTORY_COLUMNS,
    ShownLayers,
    check_on_grid,
    history_rows,
    session_layers,
    show_slice,
    slice_on_screen,
    slice_region,
)
from ._reader import case_image_layer

#: What **Predict** covers.
SLICE_ON_SCREEN, WHOLE_VOLUME = "slice on screen", "whole volume"
#: Registered architectures a session can use (backbones, or segmenters with one).
SESSION_MODELS = ("spad_vit_*", "spad_eva_*", "spad_unetr_*")
#: Seed of a model built from the registry without weights, so the same name gives the same
#: weights (and reuses the session's feature cache) every time.
MODEL_SEED = 0
#: How often the fine-tune's progress is read (ms).
POLL_MS = 200


def build_model(name: str, weights: Path | None) -> nn.Module:
    """The session's model: a ``save_pretrained`` folder when given, else ``create_model(name)`` at seed :data:`MODEL_SEED`."""
    if weights is not None:
        return load_saved_model(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        return create_model(name)


def _reported(handler: Callable[..., None]) -> Callable[..., None]:
    """Show a :class:`SpadkitError` raised by a click handler in the widget instead of a traceback."""

    @functools.wraps(handler)
    def run(self: AnnotationWidget, *_: Any) -> None:  # a button's ``clicked`` passes its checked state
        try:
            handler(self)
        except SpadkitError as err:
            self._failed(err)

    return run


class AnnotationWidget(Container):
    """The dock widget (see the module docstring); one session at a time.

    Attributes:
        session: the open :class:`AnnotationSession`, or None.
        shown: the arrays behind the session's layers (:class:`~spadkit_napari._annotation.ShownLayers`).
        layers: the session's napari layers by role (``probability``, ``uncertainty``, ``labels``).
        busy: what runs in the worker now (e.g. ``"learning"``), or None.
        job: the running full fine-tune (``FinetuneJob``), or None.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        self.viewer = napari_viewer
        self.session: AnnotationSession | None = None
        self.shown: ShownLayers | None = None
        self.layers: dict[str, Layer] = {}
        self.busy: str | None = None
        self.job: Any = None
        self._worker: Any = None
        self.store_path = FileEdit(label="store", mode="d", nullable=True, tooltip="a spadkit OME-Zarr store (STORE.zarr)")
        self.case = ComboBox(label="case", choices=self._cases)
        self.label_name = LineEdit(label="label map", value="seg", tooltip="the label map corrections are saved to (a new one is created)")
        self.classes = SpinBox(label="classes", value=2, min=2, max=255, tooltip="classes of the segmentation, background included")
        self.model = ComboBox(label="model", choices=[n for p in SESSION_MODELS for n in list_models(p)], value="spad_vit_small")
        self.model.tooltip = f"a registered architecture (random init, seed {MODEL_SEED}) unless a weights folder is given"
        self.weights = FileEdit(label="weights", mode="d", nullable=True, tooltip="a save_pretrained folder (overrides model)")
        self.open_button = PushButton(text="Open session")
        self.region = ComboBox(label="predict", choices=[SLICE_ON_SCREEN, WHOLE_VOLUME])
        self.predict_button = PushButton(text="Predict")
        self.corrections = ComboBox(label="corrections", choices=self._labels_layers, tooltip="the labels layer whose slice on screen Learn submits")
        self.learn_button = PushButton(text="Learn", tooltip="submit the slice on screen of the corrections layer and refit at once")
        self.next_button = PushButton(text="Next slice", tooltip="go to the slice whose correction should help most, and say why")
        self.undo_button, self.redo_button = PushButton(text="Undo"), PushButton(text="Redo")
        self.finetune = CheckBox(text="then fine-tune the backbone (background process)", value=False)
        self.finetune.tooltip = "after Learn, fine-tune backbone and decoder on all corrections in a separate process (needs 2 training and 1 validation slice); swapped in when better on the validation slices"
        self.finetune_steps = SpinBox(label="fine-tune steps", value=200, min=1, max=100_000)
        self.progress = ProgressBar(label="fine-tune", value=0, min=0, max=1)
        self.cancel_button = PushButton(text="Cancel fine-tune")
        self.status = Label(value="Pick a store and a case, then Open session.")
        self.history = Table(columns=list(HISTORY_COLUMNS), label="", tooltip="one row per label version (and per fine-tune)")
        undo_redo = Container(layout="horizontal", widgets=[self.undo_button, self.redo_button], labels=False)
        super().__init__(
            widgets=[
                self.store_path, self.case, self.label_name, self.classes, self.model, self.weights, self.open_button,
                self.region, self.predict_button, self.corrections, self.learn_button, self.next_button, undo_redo,
                self.finetune, self.finetune_steps, self.progress, self.cancel_button, self.status, self.history,
            ]
        )  # fmt: skip
        self.status.native.setWordWrap(True)
        self.status.native.setMinimumHeight(5 * self.status.native.fontMetrics().lineSpacing())
        self._poll_timer = QTimer(self.native)  # stops with the widget
        self._poll_timer.setInterval(POLL_MS)
        self._poll_timer.timeout.connect(self._poll_finetune)
        self.store_path.changed.connect(self.case.reset_choices)
        self.open_button.clicked.connect(self._open)
        self.predict_button.clicked.connect(self._predict)
        self.learn_button.clicked.connect(self._learn)
        self.next_button.clicked.connect(self._next_slice)
        self.undo_button.clicked.connect(self._undo)
        self.redo_button.clicked.connect(self._redo)
        self.cancel_button.clicked.connect(self._cancel_finetune)
        self.viewer.layers.events.inserted.connect(self.corrections.reset_choices)
        self.viewer.layers.events.removed.connect(self.corrections.reset_choices)
        self._take_case_from_layers()
        self._update_buttons()

    # ------------------------------------------------------------------ fields
    def _cases(self, _: Any = None) -> list[str]:
        if self.store_path.value is None:
            return []
        try:
            return OMEZarrStore(str(self.store_path.value)).cases()
        except SpadkitError:
            return []

    def _labels_layers(self, _: Any = None) -> list[tuple[str, Labels]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Labels)]

    def _take_case_from_layers(self) -> None:
        """Prefill store and case from a layer the spadkit reader opened."""
        for layer in self.viewer.layers:
            info = layer.metadata.get("spadkit", {})
            if {"store", "case"} <= info.keys():
                self.store_path.value = info["store"]
                self.case.value = info["case"]
                return

    def _update_buttons(self) -> None:
        idle, open_ = self.busy is None, self.session is not None
        self.open_button.enabled = idle
        for button in (self.predict_button, self.learn_button, self.next_button):
            button.enabled = idle and open_
        self.undo_button.enabled = idle and open_ and bool(self.session.log.done)
        self.redo_button.enabled = idle and open_ and bool(self.session.log.undone)
        self.cancel_button.enabled = self.job is not None and not self.job.cancelled

    # ------------------------------------------------------------------ workers
    def _run(self, doing: str, work: Callable[[], Any], done: Callable[[Any], None], failed: Callable[[BaseException], None] | None = None) -> None:
        """Run ``work`` in a thread worker, then ``done(result)`` (or ``failed(error)``) in the GUI thread; the buttons wait meanwhile."""
        self.busy = doing
        self.status.value = f"{doing}..."
        self._update_buttons()
        worker = create_worker(work, _start_thread=False, _connect={"returned": done, "errored": failed or self._failed})
        worker.finished.connect(functools.partial(self._idle, worker))
        self._worker = worker
        worker.start()

    def _idle(self, worker: Any) -> None:
        if worker is self._worker:  # not when ``done`` has started the next one
            self.busy, self._worker = None, None
            self._update_buttons()

    def _failed(self, error: BaseException) -> None:
        self.status.value = f"Error: {error}"
        show_error(str(error))

    # ------------------------------------------------------------------ open
    @_reported
    def _open(self) -> None:
        url, case, label = self.store_path.value, self.case.value, self.label_name.value
        if url is None or not case:
            raise SpadkitError("no store case chosen", fix="pick a spadkit store (STORE.zarr) and one of its cases.")
        name, weights, classes = self.model.value, self.weights.value, self.classes.value

        def work() -> tuple[AnnotationSession, ShownLayers, bool]:
            store = OMEZarrStore(str(url), mode="a")
            resumed = (session_dir(store, case, label) / "session.json").is_file()
            if resumed:
                session = AnnotationSession.resume(store, case, None if weights is None else load_saved_model(weights), label)
            else:
                session = AnnotationSession(store, case, build_model(name, weights), label, num_classes=classes)
            return session, ShownLayers.of(session), resumed

        self._run(f"opening {case} (the backbone's features are computed once per case and model)", work, self._show_session)

    def _show_session(self, opened: tuple[AnnotationSession, ShownLayers, bool]) -> None:
        self.close_session()
        self.session, self.shown, resumed = opened
        session = self.session
        info = {"store": session.store.url, "case": session.case_id}
        if not any(isinstance(layer, Image) and layer.metadata.get("spadkit", {}) == info for layer in self.viewer.layers):
            data, kwargs, _ = case_image_layer(session.store, session.case_id)
            self.viewer.add_image(data, **kwargs)
        for role, layer_data in session_layers(session, self.shown, info).items():
            self.layers[role] = self.viewer.add_layer(Layer.create(*layer_data))
        self.corrections.value = self.layers["labels"]
        self.viewer.layers.selection.active = self.layers["labels"]
        self._show_history()
        how = "resumed from the store, with the model saved with it" if resumed else f"new, model {session.model_version}"
        self.status.value = f"Session on {session.case_id}/{session.label_name} ({how}): {len(session.items)} slices or boxes reviewed."

    def close_session(self) -> None:
        """Cancel a running fine-tune and remove the session's layers (the store keeps everything)."""
        if self.job is not None:
            self.job.cancel()
        self._poll_timer.stop()
        self.job = None
        for layer in self.layers.values():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.layers, self.session, self.shown = {}, None, None

    # ------------------------------------------------------------------ predict, learn, next, undo
    def _refresh(self) -> None:
        for layer in self.layers.values():
            layer.refresh()
        self._show_history()

    def _show_history(self) -> None:
        self.history.value = history_rows(self.session.history())
        self.history.native.resizeColumnsToContents()
        self.history.native.scrollToBottom()
        self._update_buttons()

    def _repredicted(self, region: tuple[slice, ...] | None) -> Any:
        """Predict ``region`` in the worker and fold it into the shown arrays; return the prediction."""
        prediction = self.session.predict(region)
        self.shown.update(prediction)
        self.shown.review(self.session)
        return prediction

    def _fold_round(self, result: Round) -> Round:
        """Fold a round's prediction (if it has one) and the reviewed region into the shown arrays, in the worker."""
        if result.prediction is not None:
            self.shown.update(result.prediction)
        self.shown.review(self.session)
        return result

    @_reported
    def _predict(self) -> None:
        region = None if self.region.value == WHOLE_VOLUME else slice_region(*slice_on_screen(self.viewer, self.layers["labels"]))

        def done(prediction: Any) -> None:
            self._refresh()
            box = prediction.region
            where = "the volume" if region is None else _slice_name(box)
            mean = float(self.shown.uncertainty[box].mean())
            self.status.value = f"Predicted {where} (model {prediction.model}); mean uncertainty {mean:.2f} nats."

        self._run("predicting", functools.partial(self._repredicted, region), done)

    @_reported
    def _learn(self) -> None:
        layer = self.corrections.value
        if layer is None:
            raise SpadkitError("no labels layer to learn from", fix="pick the corrections layer (e.g. the session's own) in 'corrections'.")
        check_on_grid(layer, self.session)
        axis, index = slice_on_screen(self.viewer, layer)
        mask = np.take(np.asarray(layer.data), index, axis=axis)

        def done(result: Round) -> None:
            self._refresh()
            self.status.value = f"Learned {AXIS_NAMES[axis]} slice {index}: {_round_text(result)}"
            if self.finetune.value and self.job is None:
                self._start_finetune(self.status.value)

        self._run(f"learning from {AXIS_NAMES[axis]} slice {index}", lambda: self._fold_round(self.session.submit_correction(axis, index, mask)), done)

    @_reported
    def _next_slice(self) -> None:
        def work() -> Any:
            hint = self.session.suggest_next()
            self._repredicted(slice_region(hint.axis, hint.index))
            return hint

        def done(hint: Any) -> None:
            show_slice(self.viewer, self.layers["labels"], hint.axis, hint.index)
            self._refresh()
            self.status.value = f"Next: {AXIS_NAMES[hint.axis]} slice {hint.index} (score {hint.score:.2f}): {hint.reason}."

        self._run("choosing the next slice", work, done)

    @_reported
    def _undo(self) -> None:
        self._restore("undo")

    @_reported
    def _redo(self) -> None:
        self._restore("redo")

    def _restore(self, op: str) -> None:
        def done(result: Round) -> None:
            self._refresh()
            self.status.value = f"{op.capitalize()}: {_round_text(result)}"

        self._run(f"{op}ing", lambda: self._fold_round(getattr(self.session, op)()), done)

    # ------------------------------------------------------------------ full fine-tune (separate process)
    def _start_finetune(self, learned: str) -> None:
        """Start the full fine-tune in its process; ``learned`` (the Learn message) stays on show."""
        steps = self.finetune_steps.value

        def started(job: Any) -> None:
            self.job = job
            self.progress.max, self.progress.value = steps, 0
            self._poll_timer.start()
            self.status.value = f"{learned} Fine-tune of the backbone started ({steps} steps, in a separate process)."
            self._update_buttons()

        def refused(error: BaseException) -> None:
            self.status.value = f"{learned} Fine-tune not started: {error}"

        self._run("starting the backbone fine-tune", lambda: self.session.start_finetune(max_steps=steps), started, refused)

    def _poll_finetune(self) -> None:
        progress = self.job.progress()
        self.progress.max = max(int(progress["max_steps"]), 1)
        self.progress.value = min(int(progress["step"]), self.progress.max)
        loss = "" if progress.get("loss") is None else f", loss {progress['loss']:.3f}"
        self.progress.native.setFormat(f"{progress['state']}: step %v/%m{loss}")
        self.progress.tooltip = progress.get("message", "")
        if self.job.running or self.busy is not None:  # scored once its process has ended and the session is free
            return
        self._poll_timer.stop()

        def work() -> Any:
            result = self.session.poll_finetune()
            if result is not None and result.accepted and self.session.visible is not None:
                self._repredicted(self.session.visible)
            return result

        def done(result: Any) -> None:
            self.job = None
            self._refresh()
            self.status.value = f"Fine-tune {progress['state']}: " + ("nothing to swap in." if result is None else _finetune_text(result))

        def failed(error: BaseException) -> None:
            self.job = None
            self._failed(error)

        self._run("scoring the fine-tuned weights on the validation slices", work, done, failed)

    def _cancel_finetune(self) -> None:
        """Stop the fine-tune's process (in a thread: it may take seconds to exit); the timer then reports it."""
        self.cancel_button.enabled = False
        create_worker(self.job.cancel, _connect={"errored": self._failed})


def _slice_name(box: tuple[slice, ...]) -> str:
    axis = next((a for a, part in enumerate(box) if part.stop - part.start == 1), 0)
    return f"{AXIS_NAMES[axis]} slice {box[axis].start}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _round_text(result: Round) -> str:
    learn = result.timings.get("learn_s", 0.0)
    return (
        f"version {result.version} saved, {result.voxels_changed} voxels changed, edit Dice {_number(result.edit_dice)}, "
        f"validation Dice {_number(result.validation_dice)}; refit and re-predicted in {learn:.2f} s."
    )


def _finetune_text(result: Any) -> str:
    verdict = "new weights swapped in" if result.accepted else "kept the previous weights"
    return (
        f"{verdict} (validation Dice {_number(result.validation_dice_before)} -> {_number(result.validation_dice_after)}, "
        f"{result.steps} steps, {result.seconds:.0f} s): {result.reason}"
    )
