"""A mapping as transformers' ``key_mapping``: ``Model.from_pretrained(folder, key_mapping=KEY_MAPPING)``.

transformers (5.x, ``conversion_mapping.get_model_conversion_mapping`` and ``core_model_loading``) turns each
``pattern: replacement`` item into a ``WeightRenaming`` and loads a checkpoint key by applying **every** renaming
whose pattern is found in it, in the dict's order (they chain), then the model class's own renames (its legacy
checkpoint names); then it adds or strips the model's ``base_model_prefix`` where that names a model key, and a key
renamed onto no model key while its original name is one keeps its original name. One renaming:

- the pattern is a regex found anywhere (``re.search``; ``^`` anchors it), with ``(?!\\w)`` appended when it ends in
  a letter or digit, so ``weight`` does not match ``weight_g``;
- the replacement is plain text, where ``\\1`` stands for the pattern's first group; there is no ``\\2``;
- the first occurrence of the matched text is replaced (``str.replace(match, replacement, 1)``).

So a key_mapping only renames: an entry that needs a tensor op (transpose, reshape, fuse, split, stack, zeros)
cannot be written as one, and a checkpoint whose tensors sit inside a training container cannot be read by
``from_pretrained`` at all. ``key_mapping`` says which entries prevent it instead of writing a mapping that loads
with random weights in their place.

Rules come from ``compress_rules`` (a wrapper prefix first, as its own rule); a rule with several index groups is
written once per value of its leading indices (only ``\\1`` exists); every checkpoint key is then run through the
rules exactly as above (through transformers' own code when the model is given), and a rule that sends any key
astray is replaced by whole-key rules for its keys.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from keydiff._mapping import Entry, KeyMap, compress_rules

if TYPE_CHECKING:
    from torch import nn

__all__ = ["KeyMapping", "emit_transformers", "key_mapping"]

_GROUP = r"(\d+)"
_WIDTH = 120


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyMapping:
    """A ``key_mapping`` for ``from_pretrained``, or why there is none."""

    rules: tuple[tuple[str, str], ...] = ()
    """``(pattern, replacement)`` in the order transformers applies them."""
    blockers: tuple[str, ...] = ()
    """What a key_mapping cannot express, one phrase each (``'qkv.weight' needs concat of 3 along dim 0``)."""

    @property
    def ok(self) -> bool:
        """True when the rules load the checkpoint: nothing blocks them."""
        return not self.blockers

    @property
    def reason(self) -> str:
        """One line: why no key_mapping can be written (empty when one can)."""
        if self.ok:
            return ""
        shown = "; ".join(self.blockers[:3]) + (f"; and {len(self.blockers) - 3} more" if len(self.blockers) > 3
                                                 else "")
        return f"transformers' key_mapping only renames keys: {shown}"


def key_mapping(mapping: KeyMap, *, model: nn.Module | None = None) -> KeyMapping:
    """The mapping as ``from_pretrained``'s ``key_mapping``, checked key by key as transformers applies it.

    Args:
        mapping: a complete mapping (``Diff.mapping``).
        model: the transformers model the mapping targets (the meta device will do): when given, every key is
            renamed by transformers' own loading code, the model's own renames included.

    Returns:
        The rules, or the entries and facts that prevent them (``KeyMapping.blockers``).

    Example:
        >>> from keydiff._mapping import Evidence, Op
        >>> def entry(s, t, op="rename"):
        ...     return Entry(source=(s,), target=t, op=Op(kind=op), confidence=1.0, evidence=Evidence(method="cluster"),
        ...                  source_shapes=((2, 2),), target_shape=(2, 2))
        >>> km = KeyMap(entries=tuple(entry(f"enc.{i}.w", f"layers.{i}.weight") for i in range(3)))
        >>> key_mapping(km).rules
        (('^enc\\\\.(\\\\d+)\\\\.w$', 'layers.\\\\1.weight'),)
        >>> key_mapping(KeyMap(entries=(entry("proj", "head.weight", "transpose"),))).reason
        "transformers' key_mapping only renames keys: 'head.weight' needs transpose of 'proj'"
    """
    blockers = [_blocker(e) for e in mapping.entries if e.op.kind != "rename"]
    if mapping.unwrap.container:
        blockers.insert(0, f"the tensors sit in `{mapping.unwrap.container}` of the file, and from_pretrained reads "
                           "a flat state dict (write one with -o)")
    if not mapping.complete:
        blockers.append(f"{len(mapping.missing)} model keys have no source")
    if blockers:
        return KeyMapping(blockers=tuple(blockers))
    wanted = {e.source[0]: e.target for e in mapping.entries}
    others = {u.key for u in mapping.unused}
    strip = mapping.unwrap.strip_prefix
    unwrap = [(f"^{re.escape(strip)}", "")] if strip else []
    stripped = [replace(e, source=(e.source[0][len(strip):] if e.source[0].startswith(strip) else e.source[0],))
                for e in mapping.entries] if strip else list(mapping.entries)
    rules = [r for rule in compress_rules(stripped) if rule.op == "rename"
             for r in _single_group(rule.pattern, rule.replace, [e.source[0] for e in stripped])]
    run = _runner(model)
    model_keys = set(wanted.values())
    while rules:
        astray = _astray(run(unwrap + rules), wanted, others, model_keys)
        # a rule that fires on the way of a key sent astray gives its keys up to whole-key rules, which match
        # nothing else; each pass drops at least one rule, or stops
        bad = {n for k in astray for n in _fired(k, unwrap, rules)}
        if not bad:
            break
        rules = [r for n, r in enumerate(rules) if n not in bad]
    covered = run(unwrap + rules)
    exact = [(f"^{re.escape(k[len(strip):] if strip and k.startswith(strip) else k)}$", t)
             for k, t in wanted.items() if covered(k) != t]
    final = unwrap + rules + exact
    astray = _astray(run(final), wanted, others, model_keys)
    if astray:
        key, where = next(iter(astray.items()))
        return KeyMapping(blockers=(
            f"the renames chain (transformers applies every matching rule, then the model's own renames): "
            f"{key!r} would load as {where!r}" + (f", and {len(astray) - 1} more" if len(astray) > 1 else ""),))
    return KeyMapping(rules=tuple(final))


def _blocker(e: Entry) -> str:
    sources = ", ".join(repr(s) for s in e.source[:3]) + (", ..." if len(e.source) > 3 else "")
    return f"{e.target!r} needs {e.op.describe()}" + (f" of {sources}" if sources else "")


def _single_group(pattern: str, replacement: str, keys: Iterable[str]) -> list[tuple[str, str]]:
    """A rule with several index groups as rules with one (``\\1`` is the only group transformers fills): the
    leading indices become literals, one rule per value they take among ``keys``."""
    groups = pattern.count(_GROUP)
    if groups <= 1:
        return [(pattern, replacement)]
    rx = re.compile(pattern)
    values = sorted({m.groups()[:-1] for k in keys if (m := rx.search(k))}, key=lambda v: tuple(map(int, v)))
    pieces = pattern.split(_GROUP)
    out = []
    for lead in values:
        literal = "".join(p + v for p, v in zip(pieces[:-2], lead, strict=True)) + pieces[-2] + _GROUP + pieces[-1]
        out.append((literal, re.sub(r"\\(\d+)", _filler(lead, groups), replacement)))
    return out


def _filler(lead: Sequence[str], groups: int) -> Callable[[re.Match[str]], str]:
    """``\\i`` of a replacement: the value of leading index i, and the last index becomes ``\\1``."""
    return lambda m: lead[int(m.group(1)) - 1] if int(m.group(1)) < groups else "\\1"


def _fired(key: str, unwrap: Sequence[tuple[str, str]], rules: Sequence[tuple[str, str]]) -> list[int]:
    """The rules that fire, in turn, on a key (after the wrapper rule)."""
    key = _rename(key, unwrap)
    out = []
    for n, rule in enumerate(rules):
        renamed = _rename(key, [rule])
        if renamed != key or re.search(rule[0], key):
            out.append(n)
        key = renamed
    return out


def _astray(rename: Callable[[str], str], wanted: Mapping[str, str], others: Iterable[str],
            model_keys: set[str]) -> dict[str, str]:
    """Checkpoint keys the rules send elsewhere than their target, and unused ones they send onto a model key."""
    out = {k: got for k, t in wanted.items() if (got := rename(k)) != t}
    out.update({k: got for k in others if (got := rename(k)) in model_keys})
    return out


def _runner(model: nn.Module | None) -> Callable[[Sequence[tuple[str, str]]], Callable[[str], str]]:
    """What renames one key as ``from_pretrained`` would with given rules: transformers' own code with the model's
    renames when the model is given and transformers has that code, else the semantics in this module's docstring."""
    if model is not None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # another transformers: the documented semantics stand in
            model = None
    if model is None:
        return lambda rules: lambda key: _rename(key, rules)
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def run(rules: Sequence[tuple[str, str]]) -> Callable[[str], str]:
        transforms = get_model_conversion_mapping(model, dict(rules))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def one(key: str) -> str:
            out = rename_source_key(key, renamings, converters, prefix, meta)[0]
            if out not in meta and key in meta:  # transformers keeps the original name then
                out = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)[0]
            return out

        return one

    return run


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        rx = pattern + (r"(?!\w)" if re.search(r"[a-zA-Z0-9]$", pattern) else "")
        m = re.search(f"(?:{rx})", key)
        if m is None:
            continue
        text = replacement.replace(r"\1", m.group(1)) if r"\1" in replacement and m.groups() else replacement
        key = key.replace(m.group(0), text, 1)
    return key


def emit_transformers(km: KeyMapping, mapping: KeyMap, *, fmt: str = "py", version: str = "",
                      model_class: str = "") -> str:
    """The key_mapping as a Python module defining ``KEY_MAPPING`` (``fmt="py"``) or a JSON object (``"json"``,
    for ``key_mapping=json.load(f)``). ``model_class`` names the class in the module's usage line (default: the
    ``transformers:`` spec's class, else ``AutoModel``).

    Example:
        >>> print(emit_transformers(KeyMapping(rules=((r"^enc\\.", "encoder."),)), KeyMap(), fmt="json"), end="")
        {
          "^enc\\\\.": "encoder."
        }
    """
    if fmt == "json":
        return json.dumps(dict(km.rules), indent=2) + "\n"
    cls = model_class or (mapping.model.partition(":")[2] if mapping.model.startswith("transformers:")
                          else "AutoModel")
    ckpt = (mapping.checkpoint.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "the checkpoint")
    about = (f"Generated by keydiff{' ' + version if version else ''}: {len(km.rules)} renames, applied by "
             "transformers in this order (each matching rule in turn).")
    lines = [f'"""transformers key_mapping: load {ckpt} into {cls} with from_pretrained.',
             "", *textwrap.wrap(about, _WIDTH - 4), "",
             f"    model = {cls}.from_pretrained(folder, key_mapping=KEY_MAPPING)", '"""', "", "KEY_MAPPING = {"]
    for pattern, text in km.rules:
        line = f"    {_raw(pattern)}: {_raw(text)},"
        lines += [line] if len(line) <= _WIDTH else [f"    {_raw(pattern)}:", f"        {_raw(text)},"]
    return "\n".join([*lines, "}", ""])


def _raw(s: str) -> str:
    trailing = len(s) - len(s.rstrip("\\"))
    plain = re.fullmatch(r"[ -~]*", s) and '"' not in s and trailing % 2 == 0
    return f'r"{s}"' if plain else repr(s)
