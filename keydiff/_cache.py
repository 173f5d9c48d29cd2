"""A cache of model key sets, so that diagnosing against the same timm model again imports neither torch nor timm.

One JSON file per model: its keys, shapes and dtypes in state-dict order, its tied keys, its dataflow
(``keydiff._dataflow``: a forward pass traced on the meta device, part of what makes a first build slow) and its
layout (``keydiff._layouts``), named by a hash of the model name,
its arguments and the versions of timm, torch and keydiff (any upgrade is a new entry). Files live in
``$KEYDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/keydiff``, else ``~/.cache/keydiff``; ``KEYDIFF_NO_CACHE=1`` turns the
cache off. Only timm names are cached: a ``module:callable`` is user code that can change under the same name.

The cache is an optimisation and never an error: an unreadable or corrupt entry is ignored (and rewritten), and a
directory that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from keydiff._keys import Dataflow, KeySet, Layout, TensorInfo

__all__ = ["cache_dir", "cache_path", "load_model_keys", "store_model_keys"]

_SCHEMA = "keydiff/model-keys"
_VERSION = 4  # 2: the dataflow; 3: the layout; 4: the tied keys


def cache_dir() -> Path | None:
    """The directory of cached model key sets, or None when ``KEYDIFF_NO_CACHE`` is set (to anything but 0)."""
    if os.environ.get("KEYDIFF_NO_CACHE", "").strip() not in ("", "0"):
        return None
    explicit = os.environ.get("KEYDIFF_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keydiff"


def _versions() -> dict[str, str]:
    # Read from the installed metadata: importing timm or torch to ask them is what the cache avoids.
    out = {}
    for dist in ("timm", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    from keydiff import __version__

    out["keydiff"] = __version__
    return out


def _identity(spec: str, model_args: Mapping[str, Any]) -> dict[str, Any]:
    return {"spec": spec, "args": repr(sorted(model_args.items())), "versions": _versions()}


def cache_path(spec: str, model_args: Mapping[str, Any]) -> Path | None:
    """Where the key set of ``spec`` built with ``model_args`` is cached (None: caching is off or not allowed).

    Example:
        >>> cache_path("pkg.models:build", {}) is None  # user code is never cached
        True
    """
    directory = cache_dir()
    if directory is None or ":" in spec:
        return None
    digest = hashlib.sha256(json.dumps(_identity(spec, model_args), sort_keys=True).encode()).hexdigest()
    return directory / f"{spec[:64]}-{digest[:24]}.json"


def load_model_keys(spec: str, model_args: Mapping[str, Any]) -> KeySet | None:
    """The cached key set, or None when absent, unreadable, corrupt or made for other versions."""
    path = cache_path(spec, model_args)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("schema") != _SCHEMA or doc.get("version") != _VERSION or doc.get("id") != _identity(
                spec, model_args):
            return None
        items = [(str(k), TensorInfo(tuple(int(d) for d in shape), str(dtype))) for k, shape, dtype in doc["keys"]]
        flow = _flow_from_json(doc["flow"], [k for k, _ in items])
        layout = _layout_from_json(doc["layout"], [k for k, _ in items])
        known = {k for k, _ in items}
        ties = tuple(tuple(str(k) for k in group) for group in doc["ties"])
        if not all(len(group) > 1 and set(group) <= known for group in ties):
            return None  # ties of other keys: rebuilt
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None  # absent, or corrupt: rebuilt and rewritten by the caller
    keys = KeySet.from_items(items, origin=spec, order_is_evidence=True, flow=flow, ties=ties)
    return keys if layout is None else replace(keys, layout=layout)


def store_model_keys(spec: str, model_args: Mapping[str, Any], keys: KeySet) -> Path | None:
    """Write a key set to the cache atomically; returns the file, or None when nothing was written."""
    path = cache_path(spec, model_args)
    if path is None:
        return None
    doc = {"schema": _SCHEMA, "version": _VERSION, "id": _identity(spec, model_args),
           "keys": [[k, list(info.shape), info.dtype] for k, info in keys.items()], "flow": _flow_to_json(keys),
           "layout": _layout_to_json(keys), "ties": [list(group) for group in keys.ties]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, separators=(",", ":"))
            # a reader sees the old entry or the new one, never half of one
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError:
        return None  # a read-only or full cache directory only costs speed
    return path


def _flow_to_json(keys: KeySet) -> dict[str, Any] | None:
    """The dataflow with keys as indices into the key list and modules as indices into ``order``."""
    flow = keys.flow
    if flow is None or set(flow.param_order) != set(keys):
        return None  # no dataflow, or one of other keys: the cache keeps what it can check
    at = {k: i for i, k in enumerate(keys)}
    module_at = {m: i for i, m in enumerate(flow.order)}
    return {"ran": flow.ran, "reason": flow.reason, "param_order": [at[k] for k in flow.param_order],
            "order": list(flow.order), "feeds": [[module_at[p], module_at[c]] for p, c in flow.feeds],
            "unused": [at[k] for k in flow.unused]}


def _flow_from_json(doc: dict[str, Any] | None, keys: list[str]) -> Dataflow | None:
    if doc is None:
        return None
    order = tuple(str(m) for m in doc["order"])
    param_order = tuple(keys[int(i)] for i in doc["param_order"])
    if sorted(param_order) != sorted(keys):
        raise ValueError("the cached dataflow does not cover the cached keys")
    return Dataflow(ran=bool(doc["ran"]), reason=str(doc["reason"]), param_order=param_order, order=order,
                    feeds=tuple((order[int(p)], order[int(c)]) for p, c in doc["feeds"]),
                    unused=tuple(keys[int(i)] for i in doc["unused"]))


def _layout_to_json(keys: KeySet) -> dict[str, Any] | None:
    """The layout with keys as indices into the key list."""
    layout = keys.layout
    if layout is None:
        return None
    at = {k: i for i, k in enumerate(keys)}
    return {"ran": layout.ran, "reason": layout.reason, "weights": [[at[k], use] for k, use in layout.weights],
            "rotary": [[at[k], lay, dims] for k, lay, dims in layout.rotary]}


def _layout_from_json(doc: dict[str, Any] | None, keys: list[str]) -> Layout | None:
    if doc is None:
        return None
    return Layout(ran=bool(doc["ran"]), reason=str(doc["reason"]),
                  weights=tuple((keys[int(i)], str(use)) for i, use in doc["weights"]),
                  rotary=tuple((keys[int(i)], str(lay), int(dims)) for i, lay, dims in doc["rotary"]))
