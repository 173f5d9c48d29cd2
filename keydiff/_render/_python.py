"""A mapping as a self-contained Python module: ``checkpoint_filter_fn(state_dict, model=None)`` in timm's style.

The generated module needs only ``re`` and ``torch``: a user pastes it into their code and drops keydiff. It holds

- ``CONTAINER`` and the wrapper prefix to remove, when the checkpoint has them;
- ``RULES``: anchored regex renames (``compress_rules`` over the prefix-free keys), whose order does not matter;
- per-key tables for what the rules do not cover: ``RENAMES``, ``RESHAPED`` (with the target shape), ``TRANSPOSED``,
  ``FUSED`` (q/k/v concatenated), ``SPLIT`` (a fused tensor cut into parts), ``ROTARY`` (the rows of each head of a
  rotary query or key projection reordered into the other pairing of dims), ``WEIGHT_NORM`` (a weight-normalised
  pair made into its weight) and ``NORMS`` (``g`` of a plain weight), ``ZEROS`` (tensors the checkpoint does
  not hold, made as zeros, each with the mapping's reason), and ``DROPPED`` (tensors the model has no place for);
- keys the model names as the checkpoint does pass through unchanged.

Which keys the rules cover is decided by running the generated routing here, key by key, so the tables hold exactly
the entries the rules would get wrong.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence

from keydiff._mapping import Entry, KeyMap, Rule, compress_rules

__all__ = ["FUNCTION", "emit_python"]

FUNCTION = "checkpoint_filter_fn"
"""Name of the generated function (timm's convention)."""
_WIDTH = 120
_SAFE = re.compile(r"[ -~]*")


def _str(s: str) -> str:
    """A string literal, double-quoted when that needs no escapes."""
    return f'"{s}"' if _SAFE.fullmatch(s) and '"' not in s and "\\" not in s else repr(s)


def _raw(s: str) -> str:
    """A raw string literal for a regex or a replacement."""
    trailing = len(s) - len(s.rstrip("\\"))
    ok = _SAFE.fullmatch(s) and '"' not in s and trailing % 2 == 0
    return f'r"{s}"' if ok else repr(s)


def _tuple(items: Sequence[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _item(key: str, parts: Sequence[str] | str) -> list[str]:
    """One ``key: value,`` line of a dict literal, broken over lines when too long."""
    if isinstance(parts, str):
        line = f"    {key}: {parts},"
        # a line of one word (no space) is exempt from E501: no noqa needed, so none is left unused either
        return [line] if len(line) <= _WIDTH else [f"    {key}:", f"        {parts},"]
    line = f"    {key}: {_tuple(parts)},"
    if len(line) <= _WIDTH:
        return [line]
    inner = [f"        {p}," for p in parts]  # one word per line: exempt from E501
    return [f"    {key}: (", *inner, "    ),"]


def _dict(name: str, doc: str, items: Iterable[tuple[str, Sequence[str] | str]]) -> list[str]:
    lines = [f"{name} = {{"]
    for key, value in items:
        lines += _item(key, value)
    return [*lines, "}", f'"""{doc}"""', ""]


def _replacement(replace: str) -> str:
    # \1 followed by a digit would read as \10: spell such groups \g<1>
    return re.sub(r"\\(\d+)(?=\d)", r"\\g<\1>", replace)


class _Prefix:
    def __init__(self, strip: str, add: str) -> None:
        self.strip, self.add = strip, add

    def __call__(self, key: str) -> str:
        # the same rewrite as keydiff._normalize.Prefix.apply, which the generated _name() repeats
        if self.strip:
            if not key.startswith(self.strip):
                return key
            key = key[len(self.strip):]
        return self.add + key


def _route(key: str, rules: Sequence[tuple[re.Pattern[str], str]]) -> str:
    """Where the generated loop sends a key no table names: the first matching rule, or unchanged."""
    for rx, replace in rules:
        if rx.match(key):
            return rx.sub(replace, key, count=1)
    return key


def _natural_shape(e: Entry) -> tuple[int, ...]:
    if e.op.kind == "concat":
        first = list(e.source_shapes[0])
        first[e.op.dim] = sum(s[e.op.dim] for s in e.source_shapes)
        return tuple(first)
    if e.op.kind == "split":
        part = list(e.source_shapes[0])
        part[e.op.dim] = e.op.sizes[e.op.index]
        return tuple(part)
    if e.op.kind == "transpose":
        return tuple(reversed(e.source_shapes[0]))
    if e.op.kind == "weight_norm":
        return e.source_shapes[1]
    if e.op.kind == "norm":
        return tuple(n if d == e.op.dim else 1 for d, n in enumerate(e.source_shapes[0]))
    return e.source_shapes[0]


def emit_python(mapping: KeyMap, *, version: str = "") -> str:
    """The mapping as a self-contained module defining ``checkpoint_filter_fn(state_dict, model=None)``.

    Args:
        mapping: the mapping to write out (usually ``Diff.mapping``).
        version: keydiff's version, named in the module docstring.

    Returns:
        Python source that imports only ``re`` and ``torch``.

    Example:
        >>> from keydiff._mapping import Evidence, Op
        >>> e = Entry(source=("enc.w",), target="w", op=Op(kind="rename"), confidence=1.0,
        ...           evidence=Evidence(method="cluster"), source_shapes=((2,),), target_shape=(2,))
        >>> ns = {}
        >>> exec(emit_python(KeyMap(entries=(e,))), ns)
        >>> import torch
        >>> list(ns["checkpoint_filter_fn"]({"enc.w": torch.zeros(2)}))
        ['w']
    """
    name = _Prefix(mapping.unwrap.strip_prefix, mapping.unwrap.add_prefix)
    entries = [dataclasses.replace(e, source=tuple(name(k) for k in e.source)) for e in mapping.entries]
    rules = [r for r in compress_rules(entries) if r.op == "rename"]
    compiled = [(re.compile(r.pattern), _replacement(r.replace)) for r in rules]
    tables: dict[str, list[tuple[str, Sequence[str] | str]]] = {k: [] for k in
                                                                 ("RENAMES", "RESHAPED", "TRANSPOSED", "FUSED",
                                                                  "SPLIT", "ROTARY", "WEIGHT_NORM", "NORMS",
                                                                  "ZEROS", "SHAPES")}
    used_rules: set[int] = set()
    # a tensor that fills several keys (a tie) is taken by the tables; so every entry of it must be in one
    uses = Counter(k for e in entries for k in e.source)
    for e in entries:
        target, src = _str(e.target), [_str(k) for k in e.source]
        kind = e.op.kind
        if kind == "rename":
            routed = _route(e.source[0], compiled)
            if routed != e.target or uses[e.source[0]] > 1:
                tables["RENAMES"].append((target, src[0]))
            else:
                used_rules.update(i for i, (rx, _) in enumerate(compiled) if rx.match(e.source[0]))
        elif kind == "reshape":
            tables["RESHAPED"].append((target, [src[0], _tuple([str(d) for d in e.target_shape])]))
        elif kind == "transpose":
            tables["TRANSPOSED"].append((target, src[0]))
        elif kind == "rotary":
            tables["ROTARY"].append((target, [src[0], str(e.op.heads), _str(e.op.to)]))
        elif kind == "concat":
            tables["FUSED"].append((target, [_tuple(src), str(e.op.dim)]))
        elif kind == "weight_norm":
            tables["WEIGHT_NORM"].append((target, [_tuple(src), str(e.op.dim)]))
        elif kind == "norm":
            tables["NORMS"].append((target, [src[0], str(e.op.dim)]))
        elif kind == "zeros":
            tables["ZEROS"].append((target, [_tuple([str(d) for d in e.target_shape]),
                                             f"torch.{e.op.dtype or 'float32'}", _str(e.evidence.note or "zeros")]))
        else:
            tables["SPLIT"].append((target, [src[0], str(e.op.dim), _tuple([str(s) for s in e.op.sizes]),
                                             str(e.op.index)]))
        if kind in ("concat", "split", "transpose", "weight_norm", "norm") and _natural_shape(e) != e.target_shape:
            tables["SHAPES"].append((target, _tuple([str(d) for d in e.target_shape])))
    # a rule that decides no kept key is dead weight; keep the ones the routing above relied on
    rules = [r for i, r in enumerate(rules) if i in used_rules]
    dropped = [name(u.key) for u in mapping.unused]
    return _module(mapping, rules, tables, dropped, version)


def _header(mapping: KeyMap, rules: Sequence[Rule], tables: dict, dropped: Sequence[str], version: str) -> list[str]:
    def clean(text: str) -> str:
        return text.replace("\\", "/").replace('"""', "'''")

    ckpt = clean(os.path.basename(mapping.checkpoint.rstrip("/\\")) or "the checkpoint")
    model = clean(mapping.model or "the model")
    explicit = sum(len(v) for k, v in tables.items() if k != "SHAPES")
    status = "" if mapping.complete else (f" INCOMPLETE: {len(mapping.missing)} model keys have no source in the "
                                          "checkpoint; load with strict=False or fill them.")
    about = (f"Generated by keydiff{' ' + version if version else ''} from a mapping of {len(mapping.entries)} "
             f"entries: {len(rules)} rules, {explicit} per-key entries, {len(dropped)} dropped tensors. Needs only "
             f"torch.{status}")
    return [
        *textwrap.wrap(f'"""Convert a {ckpt} state dict to the keys and layouts of {model}.', _WIDTH - 4),
        "",
        *textwrap.wrap(about, _WIDTH - 4),
        "",
        "    state_dict = checkpoint_filter_fn(torch.load(path, map_location=\"cpu\", weights_only=True))",
        "    model.load_state_dict(state_dict, strict=True)",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        *(["import re", ""] if rules else []),
        "import torch",
        "",
    ]


def _module(mapping: KeyMap, rules: Sequence[Rule], tables: dict, dropped: Sequence[str], version: str) -> str:
    lines = _header(mapping, rules, tables, dropped, version)
    unwrap = mapping.unwrap
    if unwrap.container:
        parts = _tuple([_str(p) for p in unwrap.container.split(".")])
        lines += [f"CONTAINER = {parts}", '"""Where the tensors sit in a training checkpoint."""', ""]
    if unwrap.strip_prefix:
        lines += [f"STRIP_PREFIX = {_str(unwrap.strip_prefix)}",
                  '"""Wrapper prefix removed from every key that has it (DataParallel, torch.compile...)."""', ""]
    if unwrap.add_prefix:
        lines += [f"ADD_PREFIX = {_str(unwrap.add_prefix)}", '"""Prefix the model\'s keys carry."""', ""]
    if rules:
        lines.append("RULES = [")
        for r in rules:
            line = f"    (re.compile({_raw(r.pattern)}), {_raw(_replacement(r.replace))}),"
            lines += [line] if len(line) <= _WIDTH else [
                "    (", f"        re.compile({_raw(r.pattern)}),",
                f"        {_raw(_replacement(r.replace))},", "    ),"]
        lines += ["]", '"""Anchored renames; a key matches at most one rule\'s answer, so their order does not '
                  'matter."""', ""]
    docs = {
        "RENAMES": "target key: checkpoint key, for renames the rules do not cover.",
        "RESHAPED": "target key: (checkpoint key, target shape), same elements in a new shape.",
        "TRANSPOSED": "target key: checkpoint key of the transposed 2-D tensor.",
        "FUSED": "target key: (checkpoint keys, dim), concatenated in this order (q, k, v).",
        "SPLIT": "target key: (checkpoint key, dim, part sizes, part), one part of a fused tensor.",
        "ROTARY": "target key: (checkpoint key, heads, layout), each head's rows put in that rotary layout.",
        "WEIGHT_NORM": "target key: ((g key, v key), dim), the weight g * v / ||v||, norm over every dim but dim.",
        "NORMS": "target key: (weight key, dim), g = ||w|| over every dim but dim (v = w beside it).",
        "ZEROS": "target key: (shape, dtype, why), a tensor the checkpoint does not hold, made as zeros.",
        "SHAPES": "target key: shape, for ops whose result is then reshaped.",
    }
    for table, items in tables.items():
        if items:
            lines += _dict(table, docs[table], items)
    if dropped:
        lines.append("DROPPED = frozenset({")
        lines += [f"    {_str(k)}," for k in dropped]
        lines += ["})", '"""Checkpoint tensors the model has no place for."""', ""]
    lines += _function(mapping, bool(rules), tables, bool(dropped))
    return "\n".join(lines) + "\n"


def _function(mapping: KeyMap, rules: bool, tables: dict, dropped: bool) -> list[str]:
    unwrap = mapping.unwrap
    out = [""]
    if unwrap.strip_prefix and unwrap.add_prefix:
        name = ["    if not key.startswith(STRIP_PREFIX):", "        return key",
                "    return ADD_PREFIX + key[len(STRIP_PREFIX):]"]
    elif unwrap.strip_prefix:
        name = ["    return key[len(STRIP_PREFIX):] if key.startswith(STRIP_PREFIX) else key"]
    else:
        name = ["    return ADD_PREFIX + key"] if unwrap.add_prefix else []
    if name:
        out += ["def _name(key: str) -> str:", *name, "", ""]
    if tables["NORMS"]:
        out += ["def _norm_except(t: torch.Tensor, dim: int) -> torch.Tensor:",
                '    """The 2-norm over every dim of ``t`` but ``dim`` (-1: all of them), keeping the dims."""',
                "    dims = [d for d in range(t.dim()) if d != dim]",
                "    return t.norm(2, dim=dims, keepdim=True) if dims else t.abs()", "", ""]
    out += [
        f"def {FUNCTION}(",
        "    state_dict: dict[str, torch.Tensor], model: torch.nn.Module | None = None",
        ") -> dict[str, torch.Tensor]:",
        '    """The checkpoint\'s tensors under the model\'s keys, for ``model.load_state_dict(out, strict=True)``.',
        "",
        "    ``state_dict`` may also be the training checkpoint that holds it. ``model`` is accepted for timm's",
        "    signature and not needed: the target shapes are in the tables above.",
        '    """',
    ]
    if unwrap.container:
        out += [
            "    for name in CONTAINER:",
            "        if name in state_dict and not isinstance(state_dict[name], torch.Tensor):",
            "            state_dict = state_dict[name]",
        ]
    key_expr = "_name(k)" if name else "k"
    tensors = f"{{{key_expr}: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}}"
    explicit = [t for t in ("FUSED", "SPLIT", "WEIGHT_NORM", "NORMS", "TRANSPOSED", "ROTARY", "RESHAPED", "RENAMES",
                            "ZEROS") if tables[t]]
    if not explicit and not dropped and not rules:
        return [*out, f"    return {tensors}"]
    out.append(f"    state_dict = {tensors}")
    out.append("    out = {}")
    if explicit or dropped:
        out.append("    taken = set(DROPPED)" if dropped else "    taken = set()")
    for table in explicit:
        out += _BODY[table]
    if tables["SHAPES"]:
        out += ["    for target, shape in SHAPES.items():", "        out[target] = out[target].reshape(shape)"]
    out.append("    for key, value in state_dict.items():")
    if explicit or dropped:
        out += ["        if key in taken:", "            continue"]
    if rules:
        out += ["        for pattern, replace in RULES:",
                "            if pattern.match(key):",
                "                key = pattern.sub(replace, key, count=1)",
                "                break"]
    return [*out, "        out[key] = value", "    return out"]


_BODY = {
    "FUSED": ["    for target, (sources, dim) in FUSED.items():",
              "        out[target] = torch.cat([state_dict[k] for k in sources], dim)",
              "        taken.update(sources)"],
    "SPLIT": ["    for target, (source, dim, sizes, part) in SPLIT.items():",
              "        out[target] = state_dict[source].split(list(sizes), dim)[part]",
              "        taken.add(source)"],
    "WEIGHT_NORM": ["    for target, ((g, v), dim) in WEIGHT_NORM.items():",
                    "        # torch's kernel: what its weight-norm forward and remove_weight_norm compute",
                    "        out[target] = torch._weight_norm(state_dict[v], state_dict[g], dim)",
                    "        taken.update((g, v))"],
    "NORMS": ["    for target, (source, dim) in NORMS.items():",
              "        out[target] = _norm_except(state_dict[source], dim)",
              "        taken.add(source)"],
    "TRANSPOSED": ["    for target, source in TRANSPOSED.items():",
                   "        out[target] = state_dict[source].t()",
                   "        taken.add(source)"],
    "ROTARY": ["    for target, (source, heads, layout) in ROTARY.items():",
               "        w = state_dict[source]",
               "        half = w.shape[0] // heads // 2",
               "        grid = (heads, half, 2, -1) if layout == \"half\" else (heads, 2, half, -1)",
               "        out[target] = w.reshape(grid).transpose(1, 2).reshape(w.shape)",
               "        taken.add(source)"],
    "RESHAPED": ["    for target, (source, shape) in RESHAPED.items():",
                 "        out[target] = state_dict[source].reshape(shape)",
                 "        taken.add(source)"],
    "ZEROS": ["    for target, (shape, dtype, _why) in ZEROS.items():",
              "        out[target] = torch.zeros(shape, dtype=dtype)"],
    "RENAMES": ["    for target, source in RENAMES.items():",
                "        out[target] = state_dict[source]",
                "        taken.add(source)"],
}
