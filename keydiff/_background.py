"""One side's keys read on the other core: comparing two large safetensors files reads both headers at once.

The child is a fork that parses one header (and puts its keys in structural order) while this process parses the
other, then sends back a compact table (keys, one small index per key into the distinct (shape, dtype) kinds) with
``marshal``. Anything unusual (not Linux, other threads or torch loaded, a child that fails for any reason) makes
``result()`` return None and the caller reads the file itself, so errors are raised, and worded, in one place.
"""

from __future__ import annotations

import marshal
import os
import sys
import threading
from collections.abc import Callable

from keydiff._keys import KeySet, TensorInfo

__all__ = ["MIN_BYTES", "THREADED_MODULES", "BackgroundKeys"]

MIN_BYTES = 4 << 20
"""Headers smaller than this are read in place: a fork costs more than it saves."""
THREADED_MODULES = ("torch",)
"""Once one of these is loaded the process may run native thread pools that ``threading`` does not count: no fork
(the command line compares two safetensors files without loading torch)."""


class BackgroundKeys:
    """``read()`` run in a forked child; ``result()`` gives its key set, or None."""

    def __init__(self, read: Callable[[], KeySet]) -> None:
        self._pid = 0
        self._fd = -1
        if (not sys.platform.startswith("linux") or threading.active_count() > 1
                or any(name in sys.modules for name in THREADED_MODULES)):
            return  # forking a threaded process can deadlock the child; elsewhere fork has other caveats
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(r)
                with os.fdopen(w, "wb") as out:
                    out.write(_pack(read()))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self._pid, self._fd = pid, r

    def close(self) -> None:
        """Give up on the child (the caller failed first): it stops at its next write, and is reaped."""
        if self._pid:
            os.close(self._fd)
            os.waitpid(self._pid, 0)
            self._pid = 0

    def result(self) -> KeySet | None:
        """The child's key set, or None if there is none (the caller then reads the file itself)."""
        if not self._pid:
            return None
        with os.fdopen(self._fd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(self._pid, 0)
        self._pid = 0
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            return None
        try:
            return _unpack(data)
        except (ValueError, EOFError, TypeError):
            return None


def _pack(keys: KeySet) -> bytes:
    kinds: dict[TensorInfo, int] = {}
    index = [kinds.setdefault(info, len(kinds)) for _, info in keys.items_]
    table = [(info.shape, info.dtype) for info in kinds]
    return marshal.dumps((list(keys), index, table, keys.origin, keys.order_is_evidence))


def _unpack(data: bytes) -> KeySet:
    names, index, table, origin, order_is_evidence = marshal.loads(data)
    infos = [TensorInfo(tuple(shape), dtype) for shape, dtype in table]
    return KeySet.from_items(zip(names, map(infos.__getitem__, index), strict=True), origin=origin,
                             order_is_evidence=order_is_evidence)
