"""An index of timm's architectures for ``keydiff find``: per model its keys, shapes and dtypes, and how the shapes
move with the arguments that the checkpoint's shapes can decide (``num_classes``, ``in_chans``, ``img_size``).

Each model is built on the meta device with its defaults and once per probe (``num_classes=0``,
``num_classes=17``, ``in_chans=5``, ``img_size`` at two and three times the default); a probe records only the keys
it removes, adds or reshapes, so that ``keydiff._find`` can say which dimension follows which argument without
building anything. Models with the same keys and shapes share one key table.

The index is a zip archive: ``meta.json`` (schema, timm version, one row per model) and one JSON member per key
table (``keys/<n>.json``), read only for the few candidates a query keeps. The package ships one built for the
timm it was released with; for another timm version the index is built once into the cache directory
(``keydiff._cache.cache_dir``), resumably: models already built are kept in a parts file and skipped on restart.

Build it with ``python -m keydiff._index [OUT.zip]`` (two workers; about half an hour for timm's ~1,400 models).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from keydiff._keys import KeySet, TensorInfo, natural_key

__all__ = ["INDEX_NAME", "Index", "ModelRow", "build_index", "build_row", "index_path", "load_index", "pack_index"]

_SCHEMA = "keydiff/timm-index"
_VERSION = 1
INDEX_NAME = "timm-index.zip"
"""File name of the packaged index (in ``keydiff/data/``) and of the cached one (with the timm version)."""

PROBE_CLASSES = 17
"""The ``num_classes`` a probe builds with: prime, so no default width equals it by chance."""
PROBE_CHANS = 5
"""The ``in_chans`` a probe builds with."""
_JOINT = f"num_classes={PROBE_CLASSES},in_chans={PROBE_CHANS}"


def _timm_version() -> str:
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return "absent"


# --- building (in worker processes) ---------------------------------------------------------------------------


def _state(name: str, kwargs: Mapping[str, Any]) -> tuple[list[list[Any]], Any]:
    import timm
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    rows = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    return rows, model


def _delta(base: list[list[Any]], other: list[list[Any]]) -> dict[str, Any]:
    """What a probe changed: removed keys, reshaped keys (key -> shape), added keys (in order)."""
    have = {k: (shape, dtype) for k, shape, dtype in base}
    got = {k: (shape, dtype) for k, shape, dtype in other}
    return {"removed": [k for k in have if k not in got],
            "reshaped": {k: got[k][0] for k in have if k in got and got[k][0] != have[k][0]},
            "added": [[k, *got[k]] for k in got if k not in have]}


def _probe(name: str, kwargs: Mapping[str, Any], base: list[list[Any]]) -> dict[str, Any]:
    try:
        rows, _ = _state(name, kwargs)
    except Exception as exc:  # a model may refuse any argument in any way: the probe records that it did
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return _delta(base, rows)


def build_row(name: str, probes: bool = True) -> dict[str, Any]:
    """Build one timm model on the meta device with its defaults (and the probes); the index's row for it.

    Example:
        >>> row = build_row("resnet18")  # doctest: +SKIP
        >>> row["num_classes"], row["probes"]["num_classes=0"]["removed"]  # doctest: +SKIP
        (1000, ['fc.weight', 'fc.bias'])
    """
    try:
        base, model = _state(name, {})
    except Exception as exc:  # recorded, so that a resumed build does not retry it and the index says why
        return {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = cfg.get("input_size") or (3, 224, 224)
    row: dict[str, Any] = {"name": name, "keys": base, "num_classes": getattr(model, "num_classes", None),
                           "input_size": list(size), "classifier": cfg.get("classifier"),
                           "params": _init_params(type(model)), "probes": {}}
    del model
    if probes:
        row["probes"] = _probes(name, base, size)
    else:
        del row["probes"]
    return row


def _probe_row(name: str) -> dict[str, Any]:
    """The second pass: the probes of a model whose keys are in the index already."""
    row = build_row(name)
    return {"name": name, "probes": row.get("probes", {})} if "error" not in row else row


def _probes(name: str, base: list[list[Any]], size: Any) -> dict[str, Any]:
    probes: dict[str, Any] = {}
    # one probe for both linear arguments: they reshape different keys (the head, the stem), and where one key
    # moves with both, ``split_probes`` tells them apart by the step of each dimension
    joint = _probe(name, {"num_classes": PROBE_CLASSES, "in_chans": PROBE_CHANS}, base)
    if "error" in joint:  # one of the two is refused: the head alone still says how num_classes moves
        probes[f"num_classes={PROBE_CLASSES}"] = _probe(name, {"num_classes": PROBE_CLASSES}, base)
    else:
        probes[_JOINT] = joint
    height = int(size[-2]) if len(size) >= 2 else 224
    twice = _probe(name, {"img_size": 2 * height}, base)
    probes[f"img_size={2 * height}"] = twice
    if "error" not in twice and (twice["reshaped"] or twice["added"] or twice["removed"]):
        probes[f"img_size={3 * height}"] = _probe(name, {"img_size": 3 * height}, base)
    return probes


def split_probes(probes: Mapping[str, Any], num_classes: int | None, in_chans: int,
                 keys: Mapping[str, list[int]]) -> dict[str, Any]:
    """The probes with the joint ``num_classes``/``in_chans`` probe split in two, and ``num_classes=0`` (not
    built: a head that ``num_classes`` reshapes is the head ``num_classes=0`` removes) read from it.

    A dimension that moves from ``d0`` to ``d1`` follows ``num_classes`` when ``d1 - d0`` is a multiple of the
    probe's step in classes, else ``in_chans`` when it is a multiple of the step in channels.
    """
    out = {k: v for k, v in probes.items() if k != _JOINT}
    classes, chans = f"num_classes={PROBE_CLASSES}", f"in_chans={PROBE_CHANS}"
    joint = probes.get(_JOINT)
    if joint is not None:
        split: dict[str, dict[str, list[int]]] = {classes: {}, chans: {}}
        for k, shape in joint["reshaped"].items():
            steps = [b - a for a, b in zip(keys[k], shape, strict=False) if a != b]
            if num_classes not in (None, PROBE_CLASSES) and all(s % (PROBE_CLASSES - num_classes) == 0 for s in steps):
                split[classes][k] = shape
            elif all(s % (PROBE_CHANS - in_chans) == 0 for s in steps):
                split[chans][k] = shape
        out[classes] = {"removed": [], "reshaped": split[classes], "added": []}
        out[chans] = {"removed": [], "reshaped": split[chans], "added": []}
    head = out.get(classes)
    if "num_classes=0" not in out and head is not None:
        out["num_classes=0"] = head if "error" in head else {"removed": list(head["reshaped"]), "reshaped": {},
                                                             "added": [], "derived": True}
    return out


def _init_params(cls: type) -> list[str]:
    """Names of the keyword arguments the model's class takes (what ``keydiff._find`` may say shapes leave open)."""
    import inspect

    try:
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return []


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")


def _done(parts: Path) -> tuple[set[str], set[str]]:
    """Names whose keys, and names whose probes, the parts file holds (a failed build counts as both)."""
    keyed, probed = set(), set()
    if parts.exists():
        for row in _read_parts(parts):
            if "keys" in row or "error" in row:
                keyed.add(row["name"])
            if "probes" in row or "error" in row:
                probed.add(row["name"])
    return keyed, probed


def build_index(names: Iterable[str], parts: Path, *, workers: int = 2, progress: bool = False) -> Path:
    """Build the rows of ``names`` not already in the ``parts`` file (JSON lines), appending each as it is built,
    in ``workers`` processes (0: in this one).

    Two passes: every model's keys first (one build each: every architecture becomes searchable), then the probes
    (five builds each: the arguments become inferable). Resumable: an interrupted build keeps every finished row,
    and the next call builds only the rest.
    """
    names = list(names)
    parts.parent.mkdir(parents=True, exist_ok=True)
    keyed, _ = _done(parts)
    _run(functools.partial(build_row, probes=False), [n for n in names if n not in keyed], parts, workers, progress)
    _, probed = _done(parts)
    _run(_probe_row, [n for n in names if n not in probed], parts, workers, progress)
    return parts


def _run(task: Any, todo: list[str], parts: Path, workers: int, progress: bool) -> None:
    import multiprocessing

    if not todo:
        return
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(parts, "a", encoding="utf-8"))
        if workers == 0:  # in this process (tests, a handful of names)
            rows: Iterable[dict[str, Any]] = map(task, todo)
        else:
            # a fresh worker every 200 models: memory held by models' code goes with its worker
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, maxtasksperchild=200))
            rows = pool.imap_unordered(task, todo, chunksize=1)
        for i, row in enumerate(rows, 1):
            out.write(json.dumps(row, separators=(",", ":")) + "\n")
            out.flush()
            if progress:
                print(f"[{i}/{len(todo)}] {row['name']}{' (failed)' if 'error' in row else ''}", file=sys.stderr)


def _read_parts(parts: Path) -> Iterator[dict[str, Any]]:
    with open(parts, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def pack_index(parts: Path, out: Path, *, timm_version: str | None = None) -> Path:
    """Pack a parts file into the index archive, one key table per distinct set of keys, shapes and dtypes.

    Written atomically: a reader sees the old archive or the new one.
    """
    rows: dict[str, dict[str, Any]] = {}
    for row in _read_parts(parts):
        # a row of keys, a row of probes for them (second pass), or a failure
        rows[row["name"]] = rows.get(row["name"], {}) | row
    tables: dict[str, int] = {}
    members: list[str] = []
    meta_rows = []
    for name in sorted(rows, key=natural_key):
        row = rows[name]
        if "keys" not in row:
            meta_rows.append({"name": name, "error": row.get("error", "not built")})
            continue
        text = json.dumps(row["keys"], separators=(",", ":"))
        table = tables.setdefault(text, len(tables))
        if table == len(members):
            members.append(text)
        probes = split_probes(row.get("probes", {}), row["num_classes"], int(row["input_size"][0]),
                              {k: shape for k, shape, _ in row["keys"]})
        # the fingerprint leaves out what an argument reshapes (head, position table, stem): a checkpoint with
        # another head or image size scores as high as one with the defaults
        moved = {k for p in probes.values() if "error" not in p for k in (*p["reshaped"], *p["removed"])}
        meta_rows.append({k: v for k, v in row.items() if k not in ("keys", "error")} | {
            "table": table, "probes": probes,
            "fingerprint": _fingerprint([r for r in row["keys"] if r[0] not in moved]),
            "moved": _fingerprint([r for r in row["keys"] if r[0] in moved])})
    meta = {"schema": _SCHEMA, "version": _VERSION, "timm": timm_version or _timm_version(), "models": meta_rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_LZMA) as z:
            z.writestr("meta.json", json.dumps(meta, separators=(",", ":")))
            for i, text in enumerate(members):
                z.writestr(f"keys/{i}.json", text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp's file is private; package data is read by every user
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return out


# --- reading ------------------------------------------------------------------------------------------------------


def _fingerprint(keys: list[list[Any]]) -> list[list[int]]:
    """Sizes of the floating-point tensors as ``[numel, count]`` pairs: what ``keydiff._find`` compares first."""
    from collections import Counter

    sizes: Counter[int] = Counter()
    for _, shape, dtype in keys:
        if dtype.startswith(("float", "bfloat")) and shape:
            n = 1
            for d in shape:
                n *= d
            sizes[n] += 1
    return sorted([n, c] for n, c in sizes.items())


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRow:
    """One timm architecture in the index."""

    name: str
    """Its timm name."""
    table: int
    """Its key table; models with the same table have the same keys, shapes and dtypes."""
    num_classes: int | None
    """Its default ``num_classes``."""
    input_size: tuple[int, ...]
    """Its default input size, ``(channels, height, width)``."""
    classifier: str | None
    """The module timm calls its classifier (``pretrained_cfg["classifier"]``)."""
    params: tuple[str, ...] = ()
    """Keyword arguments its class takes."""
    probes: Mapping[str, Mapping[str, Any]]
    """Per probe (``num_classes=0``...): the keys it removed, reshaped and added, or the error it raised."""
    fingerprint: Mapping[int, int] = field(repr=False)
    """Count of floating-point tensors per number of elements, but for those an argument reshapes."""
    moved: Mapping[int, int] = field(default_factory=dict, repr=False)
    """The same count for the tensors an argument reshapes (head, position table, stem) at the defaults."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Index:
    """The index: a row per timm architecture and key tables read on demand."""

    path: Path
    """The archive."""
    timm: str
    """The timm version it was built with."""
    rows: tuple[ModelRow, ...]
    """The architectures that built, in natural name order."""
    failed: Mapping[str, str]
    """Architectures that did not build on the meta device, with the error."""

    def keys(self, table: int, *, origin: str = "") -> KeySet:
        """The key set of a key table, in state-dict order."""
        with zipfile.ZipFile(self.path) as z:
            rows = json.loads(z.read(f"keys/{table}.json"))
        return KeySet.from_items([(k, TensorInfo(tuple(s), d)) for k, s, d in rows], origin=origin,
                                 order_is_evidence=True)

    def restrict(self, names: Iterable[str]) -> Index:
        """The same index with only ``names`` (tests and narrowed searches)."""
        keep = set(names)
        return Index(path=self.path, timm=self.timm, rows=tuple(r for r in self.rows if r.name in keep),
                     failed={k: v for k, v in self.failed.items() if k in keep})


def _packaged() -> Path:
    return Path(__file__).resolve().parent / "data" / INDEX_NAME


def index_path(timm_version: str | None = None) -> Path | None:
    """The cached index for a timm version (None when caching is off)."""
    from keydiff._cache import cache_dir

    directory = cache_dir()
    if directory is None:
        return None
    return directory / f"timm-index-{timm_version or _timm_version()}.zip"


def read_index(path: Path) -> Index:
    """Read an index archive's table of models (the key tables stay in the archive until asked for)."""
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("meta.json"))
    if meta.get("schema") != _SCHEMA or meta.get("version") != _VERSION:
        raise ValueError(f"{path} is not a keydiff timm index of version {_VERSION}")
    rows, failed = [], {}
    for m in meta["models"]:
        if "error" in m:
            failed[m["name"]] = m["error"]
            continue
        rows.append(ModelRow(name=m["name"], table=int(m["table"]), num_classes=m.get("num_classes"),
                             input_size=tuple(m.get("input_size") or ()), classifier=m.get("classifier"),
                             params=tuple(m.get("params") or ()), probes=m.get("probes") or {},
                             fingerprint={int(n): int(c) for n, c in m["fingerprint"]},
                             moved={int(n): int(c) for n, c in m.get("moved", ())}))
    return Index(path=path, timm=str(meta["timm"]), rows=tuple(rows), failed=failed)


def load_index(*, build: bool = True, progress: bool = False) -> Index | None:
    """The index for the installed timm: the one ``$KEYDIFF_INDEX`` names, else the packaged one when its timm
    version matches, else the cached one, else (``build=True``) one built now into the cache. None when none is
    available."""
    version = _timm_version()
    explicit = os.environ.get("KEYDIFF_INDEX")
    if explicit:
        try:
            return read_index(Path(explicit))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            from keydiff._errors import UsageError

            raise UsageError(f"KEYDIFF_INDEX={explicit}: not a readable keydiff index ({exc})") from exc
    for path in (_packaged(), index_path(version)):
        if path is None or not path.exists():
            continue
        try:
            index = read_index(path)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            continue  # corrupt or of another schema: the next source, or a rebuild
        if index.timm == version:
            return index
    target = index_path(version)
    if not build or target is None:
        return None
    import timm

    parts = target.with_suffix(".parts.jsonl")
    build_index(timm.list_models(), parts, progress=progress)
    return read_index(pack_index(parts, target, timm_version=version))


def main(argv: list[str]) -> None:
    """``python -m keydiff._index [OUT.zip] [--parts PARTS.jsonl] [--workers N] [--only NAME...]``."""
    import argparse
    from collections import Counter

    import timm

    parser = argparse.ArgumentParser(prog="python -m keydiff._index", description=main.__doc__)
    parser.add_argument("out", nargs="?", default=str(_packaged()))
    parser.add_argument("--parts", default=None, help="resumable build file (default: OUT.parts.jsonl)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="timm names or patterns (default: all)")
    args = parser.parse_args(argv)
    names = timm.list_models(args.only) if args.only else timm.list_models()
    # architectures with the most published weights first: an interrupted build has the likeliest answers
    tags = Counter(t.partition(".")[0] for t in timm.list_pretrained())
    names = sorted(names, key=lambda n: -tags[n])
    out = Path(args.out)
    parts = Path(args.parts) if args.parts else out.with_suffix(".parts.jsonl")
    build_index(names, parts, workers=args.workers, progress=True)
    pack_index(parts, out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
