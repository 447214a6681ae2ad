"""Import the Azure ML driver script and call its init() and run()."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


class ScriptError(Exception):
    """The driver script is missing or lacks init()/run()."""


class UserScript:
    """The loaded driver script: ``init()`` once, ``invoke(raw)`` per request."""

    def __init__(self, path: Path, app_root: Path | None = None) -> None:
        self.path = path
        module = _import(path, app_root)
        for name in ("init", "run"):
            if not callable(getattr(module, name, None)):
                raise ScriptError(f"{path} does not define {name}()")
        # Azure SDK driver scripts forward run() to the real score module; call it directly
        # as Azure's server does. Their init() does extra work, so it is kept.
        driven = getattr(module, "driver_module", None)
        if isinstance(driven, ModuleType) and callable(getattr(driven, "run", None)):
            self._run: Callable[..., Any] = driven.run
        else:
            self._run = module.run
        self.init: Callable[[], Any] = module.init
        self.wants_headers = _accepts(self._run, "request_headers")

    def invoke(self, raw_data: str, headers: dict[str, str] | None = None) -> Any:
        """Call run() with the body, plus ``request_headers`` if run() declares it."""
        if self.wants_headers:
            return self._run(raw_data, request_headers=headers or {})
        return self._run(raw_data)


def _import(path: Path, app_root: Path | None) -> ModuleType:
    if not path.is_file():
        raise ScriptError(f"entry script not found: {path} (set AZUREML_ENTRY_SCRIPT)")
    # As with Azure's server: sibling modules of score.py import, and so do the modules and
    # packages at the source directory's root (score/score.py importing utils.features).
    if app_root is not None and str(app_root) not in sys.path:
        sys.path.insert(0, str(app_root))
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ScriptError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered first so that pickles and `import score` elsewhere see this same module.
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
