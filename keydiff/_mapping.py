"""The mapping: entries (source keys -> target key, with an op), compressed rules, and leftovers on both sides.

A ``KeyMap`` is a value. It applies itself to a state dict, inverts itself, and round-trips through a versioned
JSON schema (``SCHEMA``/``VERSION``); see the README for the field reference.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from keydiff._errors import MappingFileError, MappingMismatch
from keydiff._ops import Op, weight_norm_fits
from keydiff._patterns import template_of

if TYPE_CHECKING:
    import pandas as pd
    import torch

__all__ = ["SCHEMA", "VERSION", "Entry", "Evidence", "KeyMap", "Leftover", "Rule", "Unwrap", "load_mapping"]

SCHEMA = "keydiff/mapping"
VERSION = 1
Method = Literal["exact", "prefix", "convention", "cluster", "order", "unique", "verified", "tied"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """Why an entry was proposed."""

    method: str
    """``exact`` (same name), ``prefix`` (same name once a wrapper prefix is removed), ``cluster`` (names, shapes
    and index sets of whole clusters), ``order`` (shapes in structural order), ``unique`` (the only fitting pair),
    ``verified`` (changed or added by running the source model and the converted target: ``keydiff --source``),
    ``tied`` (the model ties this key to another, whose source it shares), ``convention`` (same name once a naming
    convention's rename is applied: torch's two names for a weight-norm pair)."""
    name_score: float = 1.0
    """Similarity of the canonical names, 0 to 1."""
    shape: str = "same"
    """``same``, ``reshape``, ``transpose``, ``fused`` (several sources concatenated) or ``split``."""
    cluster: str = ""
    """The cluster pair the entry came from, ``source label -> target label``."""
    note: str = ""
    """Anything else worth saying (an ambiguity, a convention used)."""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = {"method": self.method, "name_score": round(self.name_score, 3), "shape": self.shape}
        if self.cluster:
            out["cluster"] = self.cluster
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One target tensor and how to make it from the checkpoint."""

    source: tuple[str, ...]
    """Checkpoint keys, as stored in the file (wrapper prefix included); none for ``zeros``."""
    target: str
    """The model key it fills."""
    op: Op
    """How the source tensors become the target."""
    confidence: float
    """0 to 1: how sure the matcher is."""
    evidence: Evidence
    """Why."""
    source_shapes: tuple[tuple[int, ...], ...]
    """Shapes of the source tensors."""
    target_shape: tuple[int, ...]
    """Shape of the target tensor."""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "source": list(self.source),
            "target": self.target,
            "op": self.op.to_json(),
            "confidence": round(self.confidence, 3),
            "evidence": self.evidence.to_json(),
            "source_shapes": [list(s) for s in self.source_shapes],
            "target_shape": list(self.target_shape),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Leftover:
    """A key that no applied entry uses: a model key left empty, or a checkpoint tensor left unused."""

    key: str
    """The key."""
    shape: tuple[int, ...]
    """Its shape."""
    reason: str
    """Why it is left over, in words."""
    candidates: tuple[str, ...] = ()
    """The nearest keys on the other side, best first."""
    kind: str = ""
    """Of an unused checkpoint tensor, what it is: ``head``, ``tower``, ``buffer``, ``training`` (expected: the
    model has no place for it), ``copy`` (equal, values read, to a tensor the mapping uses: the checkpoint stores the
    model's one tensor once per layer) or ``depth``, ``weak``, ``shape``, ``unexplained`` (it should have gone
    somewhere)."""

    @property
    def explained(self) -> bool:
        """True for an unused tensor the model is expected not to take (see ``kind``)."""
        return self.kind in EXPECTED_UNUSED

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        out = {"key": self.key, "shape": list(self.shape), "reason": self.reason, "candidates": list(self.candidates)}
        if self.kind:
            out["kind"] = self.kind
        return out


EXPECTED_UNUSED = frozenset({"head", "tower", "buffer", "training", "copy"})
"""Kinds of unused checkpoint tensors that a correct conversion leaves behind."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """A regex rename that reproduces several entries: ``re.sub(pattern, replace, key)``."""

    pattern: str
    """Anchored regex over checkpoint keys."""
    replace: str
    """Replacement, ``\\1`` for the first index."""
    op: str
    """The op kind of every entry the rule covers (``rename`` or ``reshape``)."""
    count: int
    """How many entries it covers."""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"pattern": self.pattern, "replace": self.replace, "op": self.op, "count": self.count}


@dataclass(frozen=True, slots=True, kw_only=True)
class Unwrap:
    """Where the tensors sit in the checkpoint and which wrapper prefix their names carry."""

    container: str = ""
    """Dotted path of the tensor dict in the file (``state_dict``, ``model_ema``); empty for a flat file."""
    strip_prefix: str = ""
    """Prefix removed from checkpoint keys before matching (``module.``)."""
    add_prefix: str = ""
    """Prefix the model's keys carry that the checkpoint's lack."""


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class KeyMap:
    """A complete, applicable mapping from a checkpoint's keys to a model's.

    Example:
        >>> import torch
        >>> from keydiff._mapping import Entry, Evidence, KeyMap, Op
        >>> km = KeyMap(entries=(Entry(source=("a.w",), target="b.w", op=Op(kind="rename"), confidence=1.0,
        ...     evidence=Evidence(method="exact"), source_shapes=((2,),), target_shape=(2,)),))
        >>> list(km.apply({"a.w": torch.zeros(2)}))
        ['b.w']
    """

    entries: tuple[Entry, ...] = ()
    """What fills each target key, in the model's order."""
    rules: tuple[Rule, ...] = ()
    """Compressed regex renames, for reading and for generated code."""
    missing: tuple[Leftover, ...] = ()
    """Model keys no entry fills."""
    unused: tuple[Leftover, ...] = ()
    """Checkpoint tensors no entry uses, each with a reason."""
    unwrap: Unwrap = field(default_factory=Unwrap)
    """Container and prefix of the checkpoint."""
    model: str = ""
    """The model spec the mapping was made for."""
    checkpoint: str = ""
    """The checkpoint it was made from."""

    @property
    def complete(self) -> bool:
        """True when every model key is filled."""
        return not self.missing

    def __repr__(self) -> str:
        return (f"KeyMap(model={self.model!r}, checkpoint={self.checkpoint!r}: {len(self.entries)} entries, "
                f"{len(self.rules)} rules, {len(self.missing)} missing, {len(self.unused)} unused)")

    @property
    def unexplained(self) -> tuple[Leftover, ...]:
        """Unused checkpoint tensors that should have gone somewhere (extra blocks, weak proposals, no reason)."""
        return tuple(u for u in self.unused if not u.explained)

    @property
    def accounted(self) -> bool:
        """True when every model key is filled and every unused checkpoint tensor has an expected reason."""
        return not self.missing and not self.unexplained

    def apply(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Build the target state dict from a checkpoint's tensors.

        Args:
            state_dict: the checkpoint's tensor dict (or the whole training checkpoint holding it).

        Returns:
            ``target key -> tensor`` for every entry, in the model's order.

        Raises:
            MappingMismatch: a source key is absent or has another shape than the mapping expects.
        """
        sd = self._container(state_dict)
        self.check(sd)
        return {e.target: e.op.apply([sd[k] for k in e.source], e.target_shape) for e in self.entries}

    def check(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``MappingMismatch`` listing every way the mapping does not fit these tensors."""
        absent = sorted({k for e in self.entries for k in e.source if k not in state_dict})
        if absent:
            more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
            raise MappingMismatch(
                f"the mapping needs {len(absent)} key(s) the checkpoint lacks: {', '.join(absent[:3])}{more}; "
                "was it made for another checkpoint?"
            )
        for e in self.entries:
            for key, shape in zip(e.source, e.source_shapes, strict=True):
                got = tuple(getattr(state_dict[key], "shape", ()))
                if got != shape:
                    raise MappingMismatch(
                        f"{key}: the mapping expects shape {list(shape)}, the checkpoint has {list(got)}; "
                        "was the mapping made for another checkpoint?"
                    )

    def _container(self, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        first = next((k for e in self.entries for k in e.source), None)
        if first is None or first in obj or not self.unwrap.container:
            return obj
        for part in self.unwrap.container.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                return obj
            obj = obj[part]
        return obj

    def inverse(self) -> KeyMap:
        """The mapping that turns the converted state dict back into the mapped part of the checkpoint.

        A tensor filled with zeros came from no checkpoint tensor: the inverse lists it as unused, with that reason.
        """
        entries: list[Entry] = []
        splits: dict[str, list[Entry]] = defaultdict(list)
        made_up: list[Leftover] = []
        for e in self.entries:
            if e.op.kind == "zeros":
                made_up.append(Leftover(key=e.target, shape=e.target_shape,
                                        reason="filled with zeros by the mapping: the checkpoint has no such tensor"))
                continue
            if e.op.kind in ("split", "unstack"):
                splits[e.source[0]].append(e)
                continue
            if e.op.kind == "stack":
                for i, (key, shape) in enumerate(zip(e.source, e.source_shapes, strict=True)):
                    op = Op(kind="unstack", dim=e.op.dim, index=i, sizes=e.op.sizes)
                    entries.append(_flip(e, (e.target,), key, op, (e.target_shape,), shape))
                continue
            if e.op.kind == "concat":
                sizes = tuple(s[e.op.dim] for s in e.source_shapes)
                for i, (key, shape) in enumerate(zip(e.source, e.source_shapes, strict=True)):
                    op = Op(kind="split", dim=e.op.dim, index=i, sizes=sizes)
                    entries.append(_flip(e, (e.target,), key, op, (e.target_shape,), shape))
                continue
            if e.op.kind == "weight_norm":
                # g = ||w|| and v = w give back w exactly (g * w / ||w||), not the stored v, which any scale fits
                g, v = e.source
                entries.append(_flip(e, (e.target,), g, Op(kind="norm", dim=e.op.dim), (e.target_shape,),
                                     e.source_shapes[0]))
                same = e.source_shapes[1] == e.target_shape
                entries.append(_flip(e, (e.target,), v, Op(kind="rename" if same else "reshape"), (e.target_shape,),
                                     e.source_shapes[1]))
                continue
            if e.op.kind == "norm":
                continue  # a g computed from the weight: the weight's own entry (v = w) gives it back
            entries.append(_flip(e, (e.target,), e.source[0], e.op.inverse(), (e.target_shape,), e.source_shapes[0]))
        for key, parts in splits.items():
            parts.sort(key=lambda e: e.op.index)
            kind = "stack" if parts[0].op.kind == "unstack" else "concat"
            op = Op(kind=kind, dim=parts[0].op.dim, sizes=parts[0].op.sizes)
            sources = tuple(p.target for p in parts)
            entries.append(_flip(parts[0], sources, key, op, tuple(p.target_shape for p in parts),
                                 parts[0].source_shapes[0]))
        # a checkpoint tensor that fills several targets (a tie) comes back once, from the first
        once = {e.target: e for e in reversed(entries)}
        entries = [e for e in entries if once[e.target] is e]
        return KeyMap(entries=tuple(entries), unused=tuple(made_up), model=self.checkpoint, checkpoint=self.model)

    def to_json(self) -> dict[str, Any]:
        """The versioned JSON document (see the README for the schema)."""
        return self._document([e.to_json() for e in self.entries])

    def _document(self, entries: list) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "unwrap": {"container": self.unwrap.container, "strip_prefix": self.unwrap.strip_prefix,
                       "add_prefix": self.unwrap.add_prefix},
            "complete": self.complete,
            "entries": entries,
            "rules": [r.to_json() for r in self.rules],
            "missing": [m.to_json() for m in self.missing],
            "unused": [u.to_json() for u in self.unused],
        }

    def dumps(self) -> str:
        """The JSON document as text, stable across runs: one line per entry, rule and leftover, so that a diff
        of two mappings reads line by line (and the C encoder does the work)."""
        return "".join(self._lines())

    def dump(self, file: TextIO) -> None:
        """Write ``dumps()`` to an open text file, line by line (no 100,000-entry string is built)."""
        file.writelines(self._lines())

    def _lines(self) -> Iterator[str]:
        doc = self._document([])  # the entries are written by _entry_lines
        yield "{\n"
        items = list(doc.items())
        for n, (name, value) in enumerate(items):
            comma = "," if n < len(items) - 1 else ""
            if name == "entries" and self.entries:
                yield f" {json.dumps(name)}: [\n"
                yield from _entry_lines(self.entries)
                yield f" ]{comma}\n"
            elif isinstance(value, list) and value:
                yield f" {json.dumps(name)}: [\n"
                yield from (f"  {json.dumps(v, ensure_ascii=False)}{',' if i < len(value) - 1 else ''}\n"
                            for i, v in enumerate(value))
                yield f" ]{comma}\n"
            else:
                yield f" {json.dumps(name)}: {json.dumps(value, ensure_ascii=False)}{comma}\n"
        yield "}\n"

    @classmethod
    def from_json(cls, data: object) -> KeyMap:
        """Read a JSON document; every problem is reported with its location (``entries.3.op.kind``)."""
        return _parse(data)

    def to_frame(self) -> pd.DataFrame:
        """One row per entry: ``target, source, op, confidence, method, name_score, shape, cluster``."""
        import pandas as pd

        rows = [
            (e.target, ", ".join(e.source), e.op.describe(), e.confidence, e.evidence.method,
             e.evidence.name_score, e.evidence.shape, e.evidence.cluster)
            for e in self.entries
        ]
        cols = ["target", "source", "op", "confidence", "method", "name_score", "shape", "cluster"]
        return pd.DataFrame(rows, columns=cols)

    def _repr_html_(self) -> str:
        return self.to_frame()._repr_html_()


def _entry_lines(entries: tuple[Entry, ...]) -> list[str]:
    """``json.dumps(entry.to_json())`` of every entry, a line each with its comma: everything after the keys is
    serialised once per distinct (op, confidence, evidence, shapes), which repeats across thousands of entries
    (looked up by the objects' identity first, which costs no hashing of their fields, then by value)."""
    encode = json.encoder.encode_basestring  # what json.dumps(text, ensure_ascii=False) uses
    by_id: dict[tuple, str] = {}
    by_value: dict[tuple, str] = {}
    lines = []
    last = len(entries) - 1
    for n, e in enumerate(entries):
        tid = (id(e.op), e.confidence, id(e.evidence), e.source_shapes, e.target_shape)
        tail = by_id.get(tid)
        if tail is None:
            value = (e.op, e.confidence, e.evidence, e.source_shapes, e.target_shape)
            tail = by_value.get(value)
            if tail is None:
                doc = e.to_json()
                del doc["source"], doc["target"]
                tail = by_value[value] = json.dumps(doc, ensure_ascii=False)[1:]
            by_id[tid] = tail
        source = ", ".join(map(encode, e.source))
        lines.append(f'  {{"source": [{source}], "target": {encode(e.target)}, {tail}{"," if n < last else ""}\n')
    return lines


def _flip(e: Entry, source: tuple[str, ...], target: str, op: Op, source_shapes: tuple[tuple[int, ...], ...],
          target_shape: tuple[int, ...]) -> Entry:
    return Entry(source=source, target=target, op=op, confidence=e.confidence, evidence=e.evidence,
                 source_shapes=source_shapes, target_shape=target_shape)


def compress_rules(entries: Iterable[Entry]) -> tuple[Rule, ...]:
    """Regex renames that reproduce the one-to-one entries whose indices carry over unchanged.

    Rules rewrite key prefixes (``^encoder\\.layers\\.(\\d+)\\.`` -> ``blocks.\\1.``), as short as they can be while
    never contradicting an entry; a key matched by several rules gets the same answer from each, so their order
    does not matter. Keys whose source and target templates agree and whose indices carry over form one group: a
    rule is checked once per group, on a key made of the template with a distinct marker in every slot.
    """
    singles = [e for e in entries if len(e.source) == 1 and e.op.kind in ("rename", "reshape")]
    # group id -> (probe key, wanted target, kind, member count)
    groups: dict[tuple, list] = {}
    for e in singles:
        s_tpl, s_ix = template_of(e.source[0])
        t_tpl, t_ix = template_of(e.target)
        if s_ix == t_ix:
            gid: tuple = (s_tpl, t_tpl, e.op.kind)
            if gid in groups:
                groups[gid][3] += 1
                continue
            marks = [str(900_001 + i) for i in range(len(s_ix))]
            probe = _fill(s_tpl, marks)
            groups[gid] = [probe, _fill(t_tpl, marks), e.op.kind, 1, e.source[0], e.target]
        else:
            groups[(e.source[0],)] = [e.source[0], e.target, e.op.kind, 1, e.source[0], e.target]
    candidates: dict[tuple[str, str], str] = {}
    for _, _, kind, _, source, target in groups.values():
        s_tokens, t_tokens = source.split("."), target.split(".")
        # drop the shared tail (leaf and more), keeping at least one token on each side
        n = 0
        while n < min(len(s_tokens), len(t_tokens)) - 1 and s_tokens[-1 - n] == t_tokens[-1 - n]:
            n += 1
        for cut in range(n, -1, -1):
            s_head = ".".join(s_tokens[: len(s_tokens) - cut])
            t_head = ".".join(t_tokens[: len(t_tokens) - cut])
            s_tpl, s_ix = template_of(s_head)
            t_tpl, t_ix = template_of(t_head)
            if s_ix == t_ix and s_head != t_head:
                candidates.setdefault((s_tpl + ("." if cut else ""), t_tpl + ("." if cut else "")), kind)
    ids = list(groups)
    probes = sorted((groups[g][0], n) for n, g in enumerate(ids))  # prefix rules match one range of these
    probe_keys = [p for p, _ in probes]
    rules: list[tuple[frozenset[int], Rule]] = []
    for (s_tpl, t_tpl), kind in sorted(candidates.items()):
        pattern = "^" + r"(\d+)".join(re.escape(p) for p in s_tpl.split("{}")) + ("" if s_tpl.endswith(".") else "$")
        pieces = t_tpl.split("{}")
        replace = pieces[0] + "".join(f"\\{i + 1}{p}" for i, p in enumerate(pieces[1:]))
        rx = re.compile(pattern)
        literal = s_tpl.split("{}")[0]
        lo = bisect.bisect_left(probe_keys, literal)
        hi = bisect.bisect_left(probe_keys, literal + "\U0010ffff")
        hits = frozenset(n for probe, n in probes[lo:hi] if rx.match(probe))
        if hits and all(groups[ids[n]][1] == rx.sub(replace, groups[ids[n]][0], count=1)
                        and groups[ids[n]][2] == kind for n in hits):
            count = sum(groups[ids[n]][3] for n in hits)
            rules.append((hits, Rule(pattern=pattern, replace=replace, op=kind, count=count)))
    # keep a rule unless another one covers strictly more of the same keys
    covering: dict[int, list[int]] = defaultdict(list)
    for n, (hits, _) in enumerate(rules):
        for g in hits:
            covering[g].append(n)
    out: list[Rule] = []
    seen: set[frozenset[int]] = set()
    for n, (hits, rule) in sorted(enumerate(rules), key=lambda nr: -nr[1][1].count):
        first = next(iter(hits))
        if any(len(rules[m][0]) > len(hits) and hits <= rules[m][0] for m in covering[first] if m != n):
            continue
        if hits not in seen:
            seen.add(hits)
            out.append(rule)
    return tuple(out)


def _fill(template: str, values: list[str]) -> str:
    pieces = template.split("{}")
    return pieces[0] + "".join(v + p for v, p in zip(values, pieces[1:], strict=True))


def load_mapping(path: str | Path) -> KeyMap:
    """Read a mapping written by ``keydiff ... --json PATH``.

    Raises:
        MappingFileError: the file is missing, not JSON, of another schema version, or malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingFileError(f"{path}: cannot read the mapping file ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MappingFileError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return _parse(data)
    except MappingFileError as exc:
        raise MappingFileError(f"{path}: {exc}") from None


def _parse(data: object) -> KeyMap:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise MappingFileError(f"not a keydiff mapping (expected \"schema\": \"{SCHEMA}\")")
    if data.get("version") != VERSION:
        raise MappingFileError(
            f"mapping schema version {data.get('version')!r} is not supported (this keydiff reads version "
            f"{VERSION}); re-create the mapping with this version"
        )
    problems: list[str] = []
    entries = []
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise MappingFileError("entries: expected a list")
    for i, raw in enumerate(raw_entries):
        try:
            entries.append(_parse_entry(raw, f"entries.{i}"))
        except MappingFileError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MappingFileError("; ".join(problems[:5]) + more)
    unwrap = data.get("unwrap") or {}
    if not isinstance(unwrap, dict) or not all(isinstance(unwrap.get(k, ""), str)
                                               for k in ("container", "strip_prefix", "add_prefix")):
        raise MappingFileError("unwrap: expected an object of strings")
    try:
        rules = tuple(Rule(pattern=r["pattern"], replace=r["replace"], op=r["op"], count=int(r["count"]))
                      for r in data.get("rules", []))
        missing = tuple(_leftover(m) for m in data.get("missing", []))
        unused = tuple(_leftover(m) for m in data.get("unused", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise MappingFileError(f"rules/missing/unused: malformed ({exc!r})") from None
    return KeyMap(
        entries=tuple(entries), rules=rules, missing=missing, unused=unused,
        unwrap=Unwrap(container=unwrap.get("container", ""), strip_prefix=unwrap.get("strip_prefix", ""),
                      add_prefix=unwrap.get("add_prefix", "")),
        model=str(data.get("model", "")), checkpoint=str(data.get("checkpoint", "")),
    )


def _leftover(raw: Mapping[str, Any]) -> Leftover:
    return Leftover(key=str(raw["key"]), shape=tuple(int(d) for d in raw["shape"]), reason=str(raw["reason"]),
                    candidates=tuple(str(c) for c in raw.get("candidates", [])), kind=str(raw.get("kind", "")))


def _shape(raw: object, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise MappingFileError(f"{where}: expected a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _parse_entry(raw: object, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise MappingFileError(f"{where}: expected an object, got {raw!r}")
    source, target = raw.get("source"), raw.get("target")
    zeros = isinstance(raw.get("op"), dict) and raw["op"].get("kind") == "zeros"  # made from nothing: no source
    if zeros and source != []:
        raise MappingFileError(f"{where}.source: a zeros entry takes no source, got {source!r}")
    if not zeros and (not isinstance(source, list) or not source or not all(isinstance(s, str) for s in source)):
        raise MappingFileError(f"{where}.source: expected a non-empty list of keys, got {source!r}")
    if not isinstance(target, str) or not target:
        raise MappingFileError(f"{where}.target: expected a key, got {target!r}")
    op = Op.from_json(raw.get("op"), f"{where}.op")
    shapes = raw.get("source_shapes")
    if not isinstance(shapes, list) or len(shapes) != len(source):
        raise MappingFileError(f"{where}.source_shapes: expected one shape per source key")
    source_shapes = tuple(_shape(s, f"{where}.source_shapes.{j}") for j, s in enumerate(shapes))
    target_shape = _shape(raw.get("target_shape"), f"{where}.target_shape")
    confidence = raw.get("confidence", 1.0)
    if not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        raise MappingFileError(f"{where}.confidence: expected a number in [0, 1], got {confidence!r}")
    ev = raw.get("evidence") or {}
    if not isinstance(ev, dict):
        raise MappingFileError(f"{where}.evidence: expected an object")
    evidence = Evidence(method=str(ev.get("method", "")), name_score=float(ev.get("name_score", 0.0)),
                        shape=str(ev.get("shape", "")), cluster=str(ev.get("cluster", "")),
                        note=str(ev.get("note", "")))
    _check_numel(op, source_shapes, target_shape, where)
    return Entry(source=tuple(source), target=target, op=op, confidence=float(confidence), evidence=evidence,
                 source_shapes=source_shapes, target_shape=target_shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_numel(op: Op, source_shapes: tuple[tuple[int, ...], ...], target: tuple[int, ...], where: str) -> None:
    """An op must preserve the element count; a mapping that does not is malformed, not merely wrong."""
    if op.kind == "zeros":
        ok = not source_shapes
    elif op.kind in ("concat", "stack"):
        ok = sum(_numel(s) for s in source_shapes) == _numel(target) and bool(op.sizes)
        ok = ok and (op.kind == "concat" or len(source_shapes) % len(op.sizes) == 0)
    elif op.kind == "unstack":
        src = source_shapes[0]
        ok = (len(source_shapes) == 1 and len(src) >= 2 and bool(op.sizes)
              and 0 <= op.index < src[0] * len(op.sizes) and 0 <= op.dim < len(src) - 1
              and sum(op.sizes) == src[op.dim + 1]
              and _numel(src[1:]) // max(src[op.dim + 1], 1) * op.sizes[op.index % len(op.sizes)] == _numel(target))
    elif op.kind == "weight_norm":
        ok = (len(source_shapes) == 2 and _numel(source_shapes[1]) == _numel(target)
              and weight_norm_fits(source_shapes[0], source_shapes[1], op.dim))
    elif op.kind == "norm":
        ok = len(source_shapes) == 1 and weight_norm_fits(target, source_shapes[0], op.dim)
    elif op.kind == "split":
        src = source_shapes[0]
        ok = (0 <= op.dim < len(src) and sum(op.sizes) == src[op.dim]
              and _numel(src) // max(src[op.dim], 1) * op.sizes[op.index] == _numel(target))
    elif op.kind == "rotary":
        ok = (len(source_shapes) == 1 and source_shapes[0] == target and len(target) >= 1
              and target[0] % (2 * op.heads) == 0)
    else:
        ok = len(source_shapes) == 1 and _numel(source_shapes[0]) == _numel(target)
    if not ok:
        raise MappingFileError(f"{where}: op {op.kind} cannot turn shapes {list(source_shapes)} into {list(target)}")
