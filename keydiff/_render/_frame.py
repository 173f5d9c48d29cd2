"""DataFrame views of a ``Diff``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from keydiff._diff import Diff

__all__ = ["diff_frame"]


def diff_frame(d: Diff) -> pd.DataFrame:
    """One row per key of both sides: ``side, key, shape, dtype, status, counterpart, op, confidence, reason``."""
    import pandas as pd

    by_target = {e.target: e for e in d.mapping.entries}
    by_source = {k: e for e in d.mapping.entries for k in e.source}
    missing = {m.key: m for m in d.mapping.missing}
    unused = {u.key: u for u in d.mapping.unused}
    rows = []
    for k, info in d.model.items():
        e = by_target.get(k)
        status = "unresolved" if e is None else "exact" if e.evidence.method in ("exact", "prefix") else "mapped"
        rows.append(("model", k, info.shape, info.dtype, status, ", ".join(e.source) if e else "",
                     e.op.describe() if e else "", e.confidence if e else None,
                     missing[k].reason if k in missing else ""))
    for k, info in d.checkpoint.items():
        e = by_source.get(k)
        status = "unused" if e is None else "exact" if e.evidence.method in ("exact", "prefix") else "mapped"
        rows.append(("checkpoint", k, info.shape, info.dtype, status, e.target if e else "",
                     e.op.describe() if e else "", e.confidence if e else None,
                     unused[k].reason if k in unused else ""))
    cols = ["side", "key", "shape", "dtype", "status", "counterpart", "op", "confidence", "reason"]
    return pd.DataFrame(rows, columns=cols)
