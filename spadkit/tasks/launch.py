"""Run pretraining through LightningCLI with configs treated as untrusted data.

Both ``spadkit pretrain`` and :func:`spadkit.demo.pretrain_demo` call
:func:`run_pretrain`. Configs are shared like datasets, so two things a YAML
could otherwise do are closed here:

* ``class_path`` (and any other import path given as a value) may only name
  objects under :data:`ALLOWED_IMPORTS` (spadkit's tasks, data and models, Lightning's callbacks,
  loggers, strategies, plugins and profilers, ``torch.optim``) or under a
  prefix listed in ``$SPADKIT_CONFIG_IMPORTS``. Anything else is refused
  *before* it is imported, using jsonargparse's import-path policy (a
  module's import alone can run code).
* Checkpoints (``ckpt_path``) are always read with ``weights_only=True``: a
  config that sets ``weights_only: false`` is refused, and a local checkpoint
  is opened tensors-only before Lightning touches it, so a hostile or
  truncated file gets an error naming it.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from spadkit.errors import SpadkitError
from spadkit.models.registry import checkpoint_error, load_state_dict

#: Folder of the bundled configs (``spadkit pretrain --config pretrain_tiny``).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: Trainer methods LightningCLI offers as subcommands.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Import paths a config value (``class_path``, ...) may name; everything else is refused.
ALLOWED_IMPORTS = (
    "spadkit.tasks",
    "spadkit.data",
    "spadkit.models",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.strategies",
    "lightning.pytorch.plugins",
    "lightning.pytorch.profilers",
    "torch.optim",
)
#: Environment variable adding comma-separated module prefixes to :data:`ALLOWED_IMPORTS` (your own callbacks or models).
IMPORTS_ENV = "SPADKIT_CONFIG_IMPORTS"
#: ``ckpt_path`` values Lightning resolves itself (not file paths).
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def bundled_config(name: str) -> str:
    """Path of a config: a bundled name (``pretrain_tiny``) or a path given as is."""
    candidate = CONFIG_DIR / f"{name}.yaml"
    return str(candidate) if "/" not in name and not name.endswith((".yaml", ".yml")) and candidate.is_file() else name


def check_config_file(path: str) -> str:
    """Read a ``--config`` file safely first, so a bad one gets an error naming it; return ``path``.

    Raises:
        SpadkitError: missing, not UTF-8, unsafe or invalid YAML, or not a mapping of settings.
    """
    from spadkit.catalog import read_yaml

    if not isinstance(read_yaml(path, error=SpadkitError), dict):
        raise SpadkitError("a config must be a mapping of settings (trainer:, model:, data:)", path=path, fix="see the bundled configs in spadkit/configs/.")
    return path


def allowed_imports() -> list[str]:
    """:data:`ALLOWED_IMPORTS` plus the comma-separated prefixes in ``$SPADKIT_CONFIG_IMPORTS``.

    Raises:
        SpadkitError: an entry of the variable is not a dotted module path.
    """
    extra = [p.strip() for p in os.environ.get(IMPORTS_ENV, "").split(",") if p.strip()]
    for prefix in extra:
        if not all(part.isidentifier() for part in prefix.split(".")) or prefix.split(".")[0] == "jsonargparse":
            raise SpadkitError(f"{IMPORTS_ENV} entry {prefix!r} is not a dotted module path", fix=f"e.g. {IMPORTS_ENV}=mylab.callbacks,mylab.models")
    return [*ALLOWED_IMPORTS, *extra]


def restrict_config_imports(allowed: Sequence[str] | None = None) -> None:
    """Make jsonargparse refuse every import path in parsed values except those under ``allowed``.

    The setting is process-wide (jsonargparse keeps one policy, and allowed
    prefixes accumulate over calls); paths that come from code (type hints,
    defaults) are not affected.

    Args:
        allowed: module prefixes; default :func:`allowed_imports`.
    """
    from jsonargparse import set_parsing_settings

    set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=list(allowed or allowed_imports()))


def check_checkpoint(ckpt_path: str | None, weights_only: bool | None) -> None:
    """Refuse ``weights_only=False`` and open a local checkpoint tensors-only.

    Args:
        ckpt_path: the ``ckpt_path`` given to ``fit``/``validate``/... (or ``None``).
        weights_only: the value the config asked for; only ``None`` or ``True`` are accepted.

    Raises:
        SpadkitError: ``weights_only`` is ``False``.
        CorruptFileError: the local checkpoint holds pickled code or is truncated.
    """
    if weights_only is False:
        raise SpadkitError(
            "weights_only: false is refused: it lets a checkpoint run arbitrary pickled code",
            path=ckpt_path,
            fix="remove weights_only from the config and the command line; spadkit always loads checkpoints with weights_only=True.",
        )
    if ckpt_path is None or str(ckpt_path) in _SPECIAL_CKPT or "://" in str(ckpt_path):
        return  # remote or Lightning-resolved: still loaded with weights_only=True below
    if not Path(ckpt_path).is_file():
        raise SpadkitError("checkpoint not found", path=ckpt_path, fix="pass an existing .ckpt file as ckpt_path.")
    load_state_dict(ckpt_path, mmap=True)  # tensors only, memory-mapped: cheap even for large checkpoints


class SpadkitLightningCLI(LightningCLI):
    """LightningCLI whose ``fit``/``validate``/``test``/``predict`` always load checkpoints with ``weights_only=True``.

    The checkpoint is checked right after parsing, before LightningCLI reads
    its hyperparameters (which it does with ``weights_only=True`` too).
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in LIGHTNING_SUBCOMMANDS:
            check_checkpoint(self.config[subcommand].get("ckpt_path"), self.config[subcommand].get("weights_only"))

    def _run_trainer(self, subcommand: str, **kwargs: Any) -> Any:
        ckpt_path = kwargs.get("ckpt_path")
        kwargs.pop("weights_only", None)  # refused at parse time unless None or True
        try:
            return getattr(self.trainer, subcommand)(weights_only=True, **kwargs)
        except pickle.UnpicklingError as error:  # e.g. a remote or "last" checkpoint with pickled code
            raise checkpoint_error(ckpt_path, error) from error

    fit = functools.partialmethod(_run_trainer, "fit")
    validate = functools.partialmethod(_run_trainer, "validate")
    test = functools.partialmethod(_run_trainer, "test")
    predict = functools.partialmethod(_run_trainer, "predict")


def run_pretrain(argv: Sequence[str]) -> int:
    """``spadkit pretrain [fit] --config NAME|FILE [--section.key value ...]`` through LightningCLI.

    The model (``spadkit.tasks.TokenizerPretrain`` or ``MIMPretrain``) and the
    data (:class:`spadkit.data.PatchDataModule`) come from the config; bundled
    configs are named without path or suffix (see ``spadkit/configs/``).

    Returns:
        0 on success. Bad configs exit through LightningCLI's parser (status 2);
        refused checkpoints raise :class:`~spadkit.errors.SpadkitError`.
    """
    args = list(argv)
    if not args or args[0] not in (*LIGHTNING_SUBCOMMANDS, "-h", "--help"):
        args.insert(0, "fit")
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            args[i + 1] = check_config_file(bundled_config(args[i + 1]))
        elif arg.startswith("--config="):
            args[i] = "--config=" + check_config_file(bundled_config(arg.removeprefix("--config=")))
    restrict_config_imports()
    saved_argv = sys.argv  # LightningCLI warns when given args while sys.argv holds others
    sys.argv = ["spadkit pretrain", *args]
    try:
        _run_cli(args)
    finally:
        sys.argv = saved_argv
    return 0


def _run_cli(args: list[str]) -> None:
    import lightning as L

    from spadkit.data import PatchDataModule

    try:
        SpadkitLightningCLI(
            L.LightningModule,
            PatchDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "spadkit pretrain", "description": f"Pretraining through LightningCLI. Bundled configs: {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}."},
        )
    except ValueError as error:  # jsonargparse wraps errors raised while instantiating the model or data
        cause = _spadkit_cause(error)
        if cause is None:
            raise
        raise cause from None


def _spadkit_cause(error: BaseException | None) -> SpadkitError | None:
    """The :class:`SpadkitError` that ``error`` was raised from (its cause/context chain), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SpadkitError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
