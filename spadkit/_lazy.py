"""Lazy package exports: ``from spadkit.data import PatchStream`` imports zarr only when asked.

A package lists ``{public name: submodule}`` and gets a module-level
``__getattr__`` (PEP 562) that imports the submodule on first access, so
``import spadkit.models`` or ``import spadkit.tasks`` stays light.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports[name]`` on first use.

    Args:
        package: the package's ``__name__``.
        exports: public name -> absolute name of the submodule that defines it.

    Returns:
        The two functions to bind as the package's ``__getattr__`` and ``__dir__``.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
