"""Plain-data classes that training checkpoints pickle beside their tensors, allowed under ``weights_only``.

Trainers save more than weights: timm's ``train.py`` saves ``args`` (an ``argparse.Namespace``), Lightning its
``hyper_parameters`` (an ``AttributeDict``), mmengine a ``HistoryBuffer`` of logged scalars (numpy arrays), the
Hugging Face Trainer numpy's random state, many a ``defaultdict``, a ``pathlib`` path, a ``datetime`` or a numpy
scalar. Each of these is rebuilt from plain values: a class whose ``__new__`` and ``__dict__`` update (or a
constructor of strings and numbers) run no code from the file. Classes of optional libraries are stood in for by
local look-alikes under their pickled names, so reading a Lightning checkpoint never imports Lightning.

Everything else (functions, ``builtins.eval``, ``os.system``, arbitrary classes) stays refused.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import pathlib
from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = ["plain_data", "plain_globals"]


class _AttributeDict:
    """Stand-in for a dict subclass (Lightning's ``AttributeDict``): rebuilt as a plain dict, since torch's safe
    loader fills only plain dicts."""

    def __new__(cls, *args: object) -> dict:  # type: ignore[misc]
        return dict(*args)


def _defaultdict(factory: object = None, *args: object) -> dict:
    """Stand-in for ``collections.defaultdict``: the items as a plain dict (the factory is dropped)."""
    return dict(*args)


class _Record:
    """Stand-in for a class that holds plain values in its ``__dict__`` (mmengine's ``HistoryBuffer``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({vars(self)!r})"


_STAND_INS: dict[str, type] = {
    "lightning.fabric.utilities.data.AttributeDict": _AttributeDict,
    "lightning_fabric.utilities.data.AttributeDict": _AttributeDict,
    "pytorch_lightning.utilities.parsing.AttributeDict": _AttributeDict,
    "mmengine.logging.history_buffer.HistoryBuffer": _Record,
}

# Constructors that build a value from plain arguments (a defaultdict's factory is one of these).
_BUILTINS = (dict, list, tuple, int, float, str, bool, bytes)


@functools.cache
def plain_globals() -> dict[str, Any]:
    """Pickled name -> object for every plain-data global allowed besides torch's own allowlist."""
    # protocol 2 (torch.save's) names builtins by their Python 2 module, __builtin__
    found: dict[str, Any] = {f"{m}.{t.__name__}": t for t in _BUILTINS for m in ("builtins", "__builtin__")}
    for obj in (argparse.Namespace, collections.deque, pathlib.PurePath,
                pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path, pathlib.PosixPath,
                datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone):
        found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    found["collections.defaultdict"] = _defaultdict
    found.update(_STAND_INS)
    found.update(_numpy_globals())
    return found


def _numpy_globals() -> dict[str, Any]:
    """numpy scalars, dtypes and arrays: rebuilt from their bytes (an object array's items are unpickled too, so
    they are checked like everything else). Both the numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names."""
    try:
        import numpy as np
        from numpy import dtypes
    except ImportError:
        return {}
    core = np._core if hasattr(np, "_core") else np.core
    found: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for prefix in ("numpy.core", "numpy._core"):
        found[f"{prefix}.multiarray.scalar"] = core.multiarray.scalar
        found[f"{prefix}.multiarray._reconstruct"] = core.multiarray._reconstruct
    for name in dir(dtypes):
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            found[f"numpy.dtypes.{name}"] = obj
    return found


def plain_data() -> AbstractContextManager[object]:
    """A context in which ``torch.load(weights_only=True)`` also rebuilds the plain-data globals (scoped: torch's
    process-wide allowlist is left as it was)."""
    import torch.serialization as serialization

    if not hasattr(serialization, "safe_globals"):  # torch < 2.5: only torch's own allowlist
        return nullcontext()
    return serialization.safe_globals([(obj, name) for name, obj in plain_globals().items()])
