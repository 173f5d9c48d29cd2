"""Tensor statistics, one tensor at a time: the numbers behind ``keydiff stats``, ``keydiff.stats`` and ``Diff.stats``.

    tensor_stats(source, keys)   one row per tensor: shape, dtype, mean, std, min, max, abs max, zero fraction, NaN
                                 and Inf counts, and a ``flag`` naming what looks wrong

Memory stays bounded: tensors are read one at a time and every statistic accumulates in float64 over slices of
``CHUNK`` elements, so no float64 copy of a whole tensor is ever made. The chunking and the progress bar are shared
with value comparison (``keydiff._values``), which sits above the engine; statistics sit below it, so that
``Diff.stats()`` imports downward.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from keydiff._keys import KeySet

__all__ = ["CHUNK", "LONG_RUN_BYTES", "STATS_COLUMNS", "tensor_stats"]

CHUNK = 1 << 22
"""Elements converted to float64 at a time (32 MB)."""
LONG_RUN_BYTES = 1 << 30
"""With ``progress=None``, a progress bar shows when the tensors add up to this many bytes and stderr is a TTY."""
STATS_COLUMNS = ("key", "shape", "dtype", "numel", "mean", "std", "min", "max", "abs_max", "zero_frac", "nan", "inf",
                 "flag")
"""Columns of ``stats()``: ``std`` is the population standard deviation; moments are over the finite elements.
(``flag``, not ``flags``: ``DataFrame.flags`` is taken.)"""


# ----------------------------------------------------------------------------------------------------- progress


@contextmanager
def _ticker(total: int, nbytes: int, progress: bool | None, label: str) -> Iterator[Callable[[], None]]:
    """Yield a function to call after each tensor; it advances a rich progress bar when one is wanted."""
    show = progress if progress is not None else nbytes >= LONG_RUN_BYTES and sys.stderr.isatty()
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """A flat float64-convertible view: complex tensors count as their real and imaginary parts."""
    import torch

    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


# ------------------------------------------------------------------------------------------------------ stats


@dataclass(slots=True)
class _Moments:
    """Running statistics over chunks (Chan et al.'s pairwise update keeps the variance stable)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    zeros: int = 0
    nan: int = 0
    inf: int = 0

    def add(self, chunk: torch.Tensor) -> None:
        import torch

        x = chunk.to(torch.float64)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nan += int(torch.isnan(x).sum())
            self.inf += int(torch.isinf(x).sum())
            x = x[finite]
        self.zeros += int((x == 0).sum())
        n = x.numel()
        if n == 0:
            return
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))


def _stats_row(key: str, t: torch.Tensor) -> tuple[Any, ...]:
    flat = _as_float(t)
    acc = _Moments()
    for start in range(0, flat.numel(), CHUNK):
        acc.add(flat[start:start + CHUNK])
    numel = flat.numel()
    nan_ = math.nan
    mean, std = (acc.mean, math.sqrt(acc.m2 / acc.n)) if acc.n else (nan_, nan_)
    lo, hi = (acc.lo, acc.hi) if acc.n else (nan_, nan_)
    flag = [name for name, hit in (("nan", acc.nan), ("inf", acc.inf), ("all zero", numel and acc.zeros == numel))
             if hit]
    return (key, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel(), mean, std, lo, hi,
            max(abs(lo), abs(hi)) if acc.n else nan_, acc.zeros / numel if numel else nan_, acc.nan, acc.inf,
            ", ".join(flag))


def tensor_stats(source: Any, keys: KeySet, *, progress: bool | None = None) -> pd.DataFrame:
    """Statistics of every tensor in ``keys``, read one at a time from ``source``.

    Args:
        source: anything with ``tensors(keys)`` yielding ``(key, tensor)`` (a ``Checkpoint``, a ``Diff``'s source).
        keys: which tensors, in this order.
        progress: show a progress bar: True, False, or None for long runs on a terminal only.

    Returns:
        One row per tensor with the columns of ``STATS_COLUMNS``; ``flag`` names ``nan``, ``inf`` and
        ``all zero`` tensors.
    """
    import pandas as pd

    rows = []
    with _ticker(len(keys), keys.nbytes, progress, "statistics") as tick:
        for key, t in source.tensors(list(keys)):
            rows.append(_stats_row(key, t))
            tick()
    return pd.DataFrame(rows, columns=list(STATS_COLUMNS))
