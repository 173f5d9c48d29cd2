"""Proof and repair by running: the converted target must compute what the source computes, module by module.

``prove`` loads the checkpoint into the source model and its conversion into the target, runs both on one random
input and compares their outputs (``keydiff._verify``). When they differ, or when the diff left proposals below
``--min-confidence`` unapplied, it repairs the mapping by running:

* Both models run with forward hooks. A target module corresponds to a source module when the mapping fills its
  tensors from that module's tensors only and fills nothing else from them (``blocks.0.norm1`` <- ``layer.0.ln_b``);
  the root, modules filled from several modules, and modules without tensors are not compared.
* The first module, in the target's execution order, whose output differs from its counterpart's (or whose
  tensors are left empty, or come one by one from several source modules) is where the conversion goes wrong:
  every compared module that ran before it agrees.
* There the alternatives are tried, each with one forward pass that ends at that module: a square 2-D weight
  transposed or not (the op a shape cannot show); the rotary query/key rows of its attention as stored or
  reordered into either pairing; the sources of a same-shaped module that runs later swapped with this module's
  (siblings that could trade roles, ``norm1``/``norm2``); a mixed module's tensors all from one of its source
  modules; unused checkpoint tensors of the right shapes, one source module at a time. An alternative is kept only
  if the module then agrees with its counterpart. Nothing it changes ran earlier and was compared, so what was kept
  before stays right. An empty or mixed module that no alternative fixes is passed over (maybe rightly so: the
  outputs decide); a differing one ends the repair.
* Rotary query/key projections are not compared: each model's output there is in its own pairing of dims. Their
  attention's output is, and their pairing is an alternative there.
* A kind of alternative that worked is tried at once at every later module of the same template (blocks 1 to 23
  after block 0, one trial), and first at each place after that. The repair ends when no compared module differs,
  at a place where no alternative works, or after ``max_trials`` trials. Its changes are kept only if the
  outputs then agree.

Proposals below ``--min-confidence`` fill their keys first, as the guess the running tests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING, NamedTuple

from keydiff._errors import ModelError
from keydiff._keys import natural_key
from keydiff._mapping import Entry, Evidence, KeyMap
from keydiff._match import name_similarity, shape_relation
from keydiff._ops import RENAME, ROTARY_LAYOUTS, Op
from keydiff._patterns import template_of
from keydiff._verify import (
    DEFAULT_TOLERANCE,
    Activation,
    Verification,
    activation_diff,
    common_vocab,
    input_shape_for,
    random_input,
    record,
    verify,
)

if TYPE_CHECKING:
    import torch
    from rich.console import Console, ConsoleOptions, RenderResult
    from torch import nn

    from keydiff._diff import Diff

__all__ = ["MAX_PER_PLACE", "MAX_TRIALS", "Change", "Proof", "prove"]

MAX_TRIALS = 48
"""Alternatives tried at most in one repair (each costs a forward pass of the target, up to the module tried)."""
MAX_PER_PLACE = 8
"""Alternatives tried at most at one module."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One model key that verification filled otherwise than the diff had."""

    target: str
    """The model key."""
    was: str
    """What filled it before (``unresolved`` when nothing did), with the method and confidence."""
    now: str
    """What fills it now."""
    why: str
    """What running showed."""


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Proof:
    """The result of running the source model and the converted target: the verified diff and what changed."""

    diff: Diff
    """The diff whose mapping verification proved, changed entries marked ``verified``; the original diff when
    the repair did not end in agreeing outputs."""
    verification: Verification
    """The outputs compared, with ``diff``'s mapping (keys it leaves empty filled by the proposals, if any)."""
    changes: tuple[Change, ...] = ()
    """Entry by entry, what verification changed."""
    trials: int = 0
    """Alternatives tried."""
    max_trials: int = MAX_TRIALS
    """The bound on them."""
    stopped: str = ""
    """Why the repair ended without agreeing outputs, when it did."""
    source: str = ""
    """The source model, as named on the command line."""
    compared: int = 0
    """Module pairs whose activations were compared in the last run of the repair (0 when none was needed)."""

    @property
    def proven(self) -> bool:
        """True when the outputs agree and every model key is filled (the CLI's exit 0 with ``--source``)."""
        return self.verification.ok and self.diff.ok

    @property
    def rel_diff(self) -> float | None:
        """The largest relative difference of the outputs that agree, or the smallest of all when none does."""
        rels = [c.rel_diff for c in self.verification.checks if c.rel_diff is not None]
        agree = [r for r in rels if r <= self.verification.tolerance]
        return max(agree) if agree else min(rels, default=None)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from keydiff._render import _rich

        yield from _rich.render_diff(self.diff, proof=self)

    def __repr__(self) -> str:
        from keydiff._render import _rich

        return (f"Proof({_rich.proof_verdict(self).plain}; {len(self.changes)} changes, {self.trials} trials; "
                f"diff={self.diff!r})")


def prove(d: Diff, source: nn.Module, target: nn.Module, *, input_shape: tuple[int, ...] | None = None,
          tolerance: float = DEFAULT_TOLERANCE, max_trials: int = MAX_TRIALS, seed: int = 0,
          source_name: str = "") -> Proof:
    """Run ``source`` (with the checkpoint's weights) and ``target`` (with the converted ones) and repair the
    mapping where they differ.

    Args:
        d: the diff of the target's keys against the checkpoint (its tensors are read through ``d.source``).
        source: the model the checkpoint belongs to; it must load the checkpoint strictly.
        target: the model the mapping converts into (built, with any weights: they are overwritten).
        input_shape: the random input's shape; default from the target's data config.
        tolerance: largest relative difference that counts as the same output (and the same activation).
        max_trials: alternatives tried at most.
        source_name: how the report names the source.

    Returns:
        A ``Proof``; ``proof.proven`` when the outputs agree and every model key is filled, ``proof.diff`` the
        diff with what verification proved.

    Raises:
        ModelError: the checkpoint does not load into the source, or the conversion not into the target.
    """
    if d.source is None:
        raise ModelError("this diff holds no tensors to run (it was made from key sets): diff a checkpoint")
    state = dict(d.source.tensors(list(d.checkpoint)))
    shape = tuple(input_shape or input_shape_for(target))
    working = _first_guess(d)
    run = dict(input_shape=shape, tolerance=tolerance, seed=seed, partial=True)
    first = verify(source, state, target, KeyMap(entries=tuple(working.values())), **run)
    name = source_name or type(source).__name__
    if first.ok and d.ok:
        return Proof(diff=d, verification=first, max_trials=max_trials, source=name)
    # one sample is enough to tell modules apart, and costs half the time and memory of the outputs' check
    x = random_input((1, *shape[1:]), seed, common_vocab(source, target))
    repair = _Repair(d, working, state, source, target, x, tolerance, max_trials)
    stopped = repair.run()
    done = dict(max_trials=max_trials, source=name, trials=repair.trials, compared=repair.compared)
    if stopped:
        return Proof(diff=d, verification=first, stopped=stopped, **done)
    final = verify(source, state, target, KeyMap(entries=tuple(repair.working.values())), **run)
    if not final.ok:
        return Proof(diff=d, verification=first, **done, stopped=(
            "every compared module agrees with its counterpart, but the outputs differ: the difference lies in "
            "what no tensor names (an activation function, a constant, the order of operations)"))
    entries, changes = repair.verified()
    return Proof(diff=d.with_entries(entries), verification=final, changes=changes, **done)


def _first_guess(d: Diff) -> dict[str, Entry]:
    """The applied entries, and the proposals below ``min_confidence`` for keys they leave empty (unless another
    entry already uses their sources)."""
    working = {e.target: e for e in d.mapping.entries}
    used = {k for e in working.values() for k in e.source}
    for e in d.proposals:
        if e.target not in working and used.isdisjoint(e.source):
            working[e.target] = e
            used.update(e.source)
    return working


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _counterparts(entries: Iterable[Entry]) -> dict[str, str]:
    """Target module -> the source module that alone fills it and fills nothing else; the root never counts."""
    sources: dict[str, set[str]] = defaultdict(set)
    targets: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        t = _module(e.target)
        for k in e.source:
            sources[t].add(_module(k))
            targets[_module(k)].add(t)
    out = {}
    for t, found in sources.items():
        if len(found) == 1 and t:
            (s,) = found
            if s and targets[s] == {t}:
                out[t] = s
    return out


def _describe(e: Entry) -> str:
    return ", ".join(e.source) + ("" if e.op.kind == "rename" else f", {e.op.describe()}")


class _Alternative(NamedTuple):
    """Entries to put in place at one module, and how each came about."""

    change: dict[str, Entry]
    how: dict[str, tuple[str, str]]
    """Per key: what was done, and to or from which module (``("swapped with", "blocks.0.norm2")``)."""
    kind: tuple
    """What kind of change between which templates: alternatives of a kind that worked are tried first."""
    rank: tuple


class _Repair:
    """The repair loop's state: the working entries, the source's activations, and what was tried."""

    def __init__(self, d: Diff, working: Mapping[str, Entry], state: Mapping[str, torch.Tensor], source: nn.Module,
                 target: nn.Module, x: torch.Tensor, tolerance: float, max_trials: int) -> None:
        self.d, self.state, self.target, self.x = d, state, target, x
        self.tolerance, self.max_trials = tolerance, max_trials
        self.working = dict(working)
        self.original = dict(working)
        self.source_acts = record(source, x)
        self.keys_of: dict[str, list[str]] = defaultdict(list)
        for k in d.model:
            self.keys_of[_module(k)].append(k)
        self.rotary = _rotary_dims(d, working)
        """Rotary query/key target keys -> dims per head: their modules' outputs are in each model's own pairing,
        so they are not compared; the attention's output is, and their pairing is an alternative there."""
        self.rotary_modules = {_module(k) for k in self.rotary}
        self.trials = 0
        self.compared = 0
        self.how: dict[str, tuple[str, str]] = {}
        self.learned: set[tuple] = set()
        self.generalised: set[tuple] = set()
        self.skipped: set[str] = set()
        self.acts: dict[str, Activation] = {}
        self._load(self.working.values())

    # -- running

    def _load(self, entries: Iterable[Entry]) -> None:
        sd = {e.target: e.op.apply([self.state[k] for k in e.source], e.target_shape) for e in entries}
        self.target.load_state_dict(sd, strict=False)

    def _rel(self, module: str, act: Activation | None, counterpart: str | None) -> float | None:
        if act is None or counterpart is None or counterpart not in self.source_acts:
            return None
        return activation_diff(self.source_acts[counterpart], act)

    def run(self) -> str:
        """Repair until no compared module differs; returns why it stopped short, or ``""``."""
        while True:
            place = self._first_difference()
            if place is None:
                return ""
            module, what = place
            start = self.trials
            for alt in self._alternatives(module):
                if self.trials >= self.max_trials:
                    return f"{module} {what}; stopped after {self.max_trials} trials"
                if self._try(module, alt):
                    if alt.kind not in self.generalised and self.trials < self.max_trials:
                        self.generalised.add(alt.kind)
                        self._try_everywhere(module, alt.kind)
                    break
            else:
                if self._mixed(module) or any(k not in self.working for k in self.keys_of[module]):
                    self.skipped.add(module)  # empty or mixed, maybe rightly: the outputs will tell
                    continue
                tried = self.trials - start
                return (f"{module} {what}, and none of the {tried} alternatives tried there made it agree"
                        if tried else f"{module} {what}, and no alternative fits its tensors")

    def _first_difference(self) -> tuple[str, str] | None:
        """Run the target up to the first module that differs from its counterpart or has empty keys."""
        counterpart = _counterparts(self.working.values())
        self.compared = 0
        found: list[tuple[str, str]] = []

        def differs(module: str, act: Activation) -> bool:
            what = self._differs(module, act, counterpart)
            if what:
                found.append((module, what))
            return bool(what)

        self.acts = record(self.target, self.x, stop=differs)
        return found[0] if found else None

    def _differs(self, module: str, act: Activation, counterpart: Mapping[str, str]) -> str:
        if module in self.skipped:
            return ""
        empty = [k for k in self.keys_of.get(module, ()) if k not in self.working]
        if empty:
            return f"has {len(empty)} empty key{'s' if len(empty) > 1 else ''}"
        mixed = self._mixed(module)
        if mixed:
            return f"takes its tensors from {len(mixed)} source modules ({', '.join(mixed)})"
        if module in self.rotary_modules:
            return ""
        rel = self._rel(module, act, counterpart.get(module))
        if rel is None:
            return ""
        self.compared += 1
        if rel > self.tolerance:
            return f"computes something else than the source's {counterpart[module]} (rel. diff {rel:.2g})"
        return ""

    def _try(self, module: str, alt: _Alternative) -> bool:
        """Put ``alt`` in place and run up to ``module``; keep it if the module then agrees with its counterpart."""
        return self._try_at([module], alt.change, alt.how, alt.kind)

    def _try_at(self, modules: list[str], change: dict[str, Entry], how: dict[str, tuple[str, str]],
                kind: tuple) -> bool:
        candidate = {**self.working, **change}
        counterpart = _counterparts(candidate.values())
        if any(counterpart.get(m) not in self.source_acts for m in modules):
            return False  # nothing to compare with: not a trial
        self.trials += 1
        current = self.target.state_dict()
        saved = {k: current[k].clone() for k in change}
        self._load(change.values())
        waiting = set(modules)

        def all_ran(module: str, act: Activation) -> bool:
            waiting.discard(module)
            return not waiting

        acts = record(self.target, self.x, stop=all_ran)
        rels = [self._rel(m, acts.get(m), counterpart[m]) for m in modules]
        if any(r is None or r > self.tolerance for r in rels):
            self.target.load_state_dict(saved, strict=False)
            return False
        self.working = candidate
        self.how.update(how)
        self.learned.add(kind)
        return True

    def _try_everywhere(self, module: str, kind: tuple) -> None:
        """What worked at ``module``, tried at once at every later module of its template (blocks 1 to 23 after
        block 0): one trial instead of one per place. All of them must agree, or none is kept (the ordinary loop
        then goes on place by place, trying this kind first)."""
        tpl = template_of(module)[0]
        places, change, how = [], {}, {}
        for m in self._pending():
            if template_of(m)[0] != tpl:
                continue
            alt = next((a for a in self._alternatives(m, limit=None) if a.kind == kind), None)
            sources = {k for e in change.values() for k in e.source}
            if alt is None or not change.keys().isdisjoint(alt.change) or any(
                    not sources.isdisjoint(e.source) for e in alt.change.values()):
                continue
            places.append(m)
            change.update(alt.change)
            how.update(alt.how)
        if len(places) > 1:
            self._try_at(places, change, how, kind)

    def _pending(self) -> list[str]:
        """Modules with keys that have not run yet in the last run, in the model's order."""
        return [m for m in self.keys_of if m not in self.acts]

    # -- alternatives

    def _alternatives(self, module: str, limit: int | None = MAX_PER_PLACE) -> Iterator[_Alternative]:
        """What could take the place of this module's entries, the kinds that worked before first."""
        keys = self.keys_of[module]
        mine = [self.working[k] for k in keys if k in self.working]
        found = [*self._unused(module, [k for k in keys if k not in self.working] or keys)]
        if len(mine) == len(keys):
            found += [*self._align(module, mine), *self._flips(module, mine), *self._swaps(module, mine)]
        found += self._rotaries(module)
        found.sort(key=lambda a: (a.kind not in self.learned, a.rank))
        return islice(found, limit)

    def _mixed(self, module: str) -> list[str]:
        """The source modules of a module filled one tensor each from several (a weight from one norm, the bias
        from another); empty for a module filled from one, or by fusing several (q, k, v into qkv)."""
        found = {_module(e.source[0]) for k in self.keys_of.get(module, ()) if (e := self.working.get(k)) is not None
                 and len(e.source) == 1}
        return sorted(found, key=natural_key) if len(found) > 1 else []

    def _align(self, module: str, mine: list[Entry]) -> Iterator[_Alternative]:
        """A mixed module's tensors all from one of its source modules, traded with the entries that hold them."""
        holder = {e.source: e for e in self.working.values() if len(e.source) == 1}
        for n, src in enumerate(self._mixed(module)):
            change, how = {}, {}
            for e in mine:
                if len(e.source) != 1 or _module(e.source[0]) == src:  # a zeros entry has no source
                    continue
                have = e.source[0]
                want = f"{src}.{have.rpartition('.')[2]}"
                if want not in self.d.checkpoint or self.d.checkpoint[want].shape != self.d.checkpoint[have].shape:
                    break
                change[e.target] = replace(e, source=(want,))
                how[e.target] = ("took the tensors of", src)
                other = holder.get((want,))
                if other is not None and other.target not in change:
                    change[other.target] = replace(other, source=(have,))
                    how[other.target] = ("traded with", module)
            else:
                yield _Alternative(change, how, ("align", template_of(module)[0], template_of(src)[0]), (0, n))

    def _flips(self, module: str, mine: list[Entry]) -> Iterator[_Alternative]:
        """Square 2-D weights transposed or not: the op their shape cannot show."""
        square = [e for e in mine if len(e.source) == 1 and len(e.target_shape) == 2
                  and e.target_shape[0] == e.target_shape[1] and e.op.kind in ("rename", "transpose")]
        groups = [square, *([e] for e in square)] if len(square) > 1 else [square]
        for n, group in enumerate(g for g in groups if g):
            change = {e.target: replace(e, op=Op(kind=kind), evidence=replace(e.evidence, shape=shape))
                      for e in group for kind, shape in [("rename", "same") if e.op.kind == "transpose" else
                                                         ("transpose", "transpose")]}
            how = {k: ("transposed" if e.op.kind == "transpose" else "not transposed", "") for k, e in change.items()}
            yield _Alternative(change, how, ("flip", template_of(module)[0]), (0, n))

    def _rotaries(self, module: str) -> Iterator[_Alternative]:
        """The rotary query/key rows of the attention ``module`` belongs to, as stored or reordered into either
        pairing: the op neither shapes nor names show (those modules ran before ``module`` but were not compared)."""
        parent = _module(module)
        mine = [self.working[k] for k in self.rotary if _module(_module(k)) == parent and k in self.working]
        if not mine or any(len(e.source) != 1 or e.op.kind not in ("rename", "rotary") for e in mine):
            return
        for n, to in enumerate(("", *ROTARY_LAYOUTS)):
            change, how = {}, {}
            for e in mine:
                op = Op(kind="rotary", heads=e.target_shape[0] // self.rotary[e.target], to=to) if to else RENAME
                if op != e.op:
                    change[e.target] = replace(e, op=op, evidence=replace(e.evidence, shape="rotary" if to else "same"))
                    how[e.target] = (f"rotary rows to {to}" if to else "rotary rows as stored", "")
            if change:
                yield _Alternative(change, how, ("rotary", template_of(parent)[0], to), (0, n))

    def _swaps(self, module: str, mine: list[Entry]) -> Iterator[_Alternative]:
        """This module's sources traded with a same-shaped module's that runs later (or never ran)."""
        def signature(m: str, entries: list[Entry]) -> tuple:
            return tuple(sorted((e.target[len(m):], e.target_shape, e.source_shapes, e.op) for e in entries))

        pending = self._pending()
        later = pending[pending.index(module) + 1:] if module in pending else pending
        sig, tpl, ix = signature(module, mine), *template_of(module)
        parent = _module(module)
        for distance, other in enumerate(later):
            theirs = [self.working.get(k) for k in self.keys_of[other]]
            if not theirs or None in theirs or signature(other, theirs) != sig:
                continue
            by_leaf = {e.target[len(other):]: e for e in theirs}
            change, how = {}, {}
            for e in mine:
                partner = by_leaf[e.target[len(module):]]
                change[e.target], change[partner.target] = replace(e, source=partner.source), replace(
                    partner, source=e.source)
                how[e.target], how[partner.target] = ("swapped with", other), ("swapped with", module)
            o_tpl, o_ix = template_of(other)
            yield _Alternative(change, how, ("swap", tpl, o_tpl, ix == o_ix),
                               (1 if _module(other) == parent else 3, distance))

    def _unused(self, module: str, keys: list[str]) -> Iterator[_Alternative]:
        """The tensors of one source module that no entry uses, for ``keys``."""
        used = {k for e in self.working.values() for k in e.source}
        pools: dict[str, list[str]] = defaultdict(list)
        for k in self.d.checkpoint:
            if k not in used:
                pools[_module(k)].append(k)
        tpl = template_of(module)[0]
        for src, pool in pools.items():
            if src not in self.source_acts:
                continue  # it never ran: nothing to compare with
            pairs = self._pair(keys, pool)
            if pairs is None:
                continue
            s_tpl = template_of(src)[0]
            score = name_similarity(tpl, s_tpl)
            change, how = {}, {}
            for k, s, rel in pairs:
                info, want = self.d.checkpoint[s], self.d.model[k]
                change[k] = Entry(source=(s,), target=k, op=Op(kind={"same": "rename"}.get(rel, rel)),
                                  confidence=1.0, evidence=Evidence(method="verified", name_score=score, shape=rel),
                                  source_shapes=(info.shape,), target_shape=want.shape)
                how[k] = ("took the unused tensors of", src)
            yield _Alternative(change, how, ("unused", tpl, s_tpl), (2, -score, natural_key(src)))

    def _pair(self, keys: list[str], pool: list[str]) -> list[tuple[str, str, str]] | None:
        """Pair model keys with checkpoint keys: by leaf name where every leaf is found, else by shape in natural
        order; None unless every key finds a tensor it can become."""
        leaves = {k.rpartition(".")[2]: k for k in pool}
        if all(k.rpartition(".")[2] in leaves for k in keys):
            chosen = [(k, leaves[k.rpartition(".")[2]]) for k in keys]
        else:
            free = sorted(pool, key=natural_key)
            chosen = []
            for k in sorted(keys, key=natural_key):
                s = next((s for s in free if shape_relation(self.d.checkpoint[s].shape, self.d.model[k].shape)), None)
                if s is None:
                    return None
                free.remove(s)
                chosen.append((k, s))
        out = []
        for k, s in chosen:
            rel = shape_relation(self.d.checkpoint[s].shape, self.d.model[k].shape)
            if rel not in ("same", "reshape", "transpose"):
                return None
            out.append((k, s, rel))
        return out

    # -- the result

    def verified(self) -> tuple[list[Entry], tuple[Change, ...]]:
        """The working entries, those that differ from the diff's marked ``verified``; and the changes.

        A change's ``why`` names keys; the entry's evidence note says the same with indices templated
        (``blocks.{}.norm2``), so that the rows of one cluster carry one note.
        """
        applied = {e.target: e for e in self.d.mapping.entries}
        counterpart = _counterparts(self.working.values())
        entries, changes = [], []
        for k, e in self.working.items():
            before = applied.get(k)
            if before is not None and before.source == e.source and before.op == e.op:
                entries.append(before)
                continue
            guess = self.original.get(k)
            module = _module(k)
            if before is None and k not in self.how and module not in self.acts:
                continue  # a proposal in a module that never ran: running says nothing about it
            # a rotary projection's output is in each model's own pairing: the outputs speak for it
            other = None if module in self.rotary_modules else counterpart.get(module)
            rel = self._rel(module, self.acts.get(module), other)
            how = self.how.get(k, ("confirmed the proposal", ""))
            if before is not None:
                was = f"{_describe(before)} ({before.evidence.method}, {before.confidence:.2f})"
                was_kind = f"was {before.evidence.method} at {before.confidence:.2f}"
            elif guess is not None:
                was = f"unresolved (proposed {_describe(guess)}, {guess.confidence:.2f}, not applied)"
                was_kind = (f"was proposed by {guess.evidence.method} at {guess.confidence:.2f}, below "
                            f"--min-confidence {self.d.min_confidence}")
            else:
                was, was_kind = "unresolved", "was unresolved"
            note = f"{was_kind}; {_why(how, module, other, None, _template)}"
            entries.append(replace(e, confidence=1.0, evidence=replace(e.evidence, method="verified", note=note)))
            changes.append(Change(target=k, was=was, now=_describe(e), why=_why(how, module, other, rel, str)))
        return entries, tuple(changes)


def _rotary_dims(d: Diff, working: Mapping[str, Entry]) -> dict[str, int]:
    """Target keys whose rows a rotary embedding pairs -> dims per head: from the model's layout, and from the
    entries that already reorder them."""
    layout = d.model.layout
    found = {k: dims for k, _, dims in (layout.rotary if layout is not None else ()) if dims}
    for k, e in working.items():
        if e.op.kind == "rotary" and e.target_shape:
            found.setdefault(k, e.target_shape[0] // e.op.heads)
    return found


def _template(key: str) -> str:
    return template_of(key)[0]


def _why(how: tuple[str, str], module: str, counterpart: str | None, rel: float | None,
         name: Callable[[str], str]) -> str:
    """What was done and what running showed, with module names as ``name`` writes them."""
    verb, other = how
    done = f"{verb} {name(other)}" if other else verb
    if counterpart is None:
        return f"{done}; {name(module)} has no single counterpart to compare, the outputs agree"
    shown = "" if rel is None else f" (rel. diff {rel:.1g})"
    return f"{done}; {name(module)} computes what the source's {name(counterpart)} does{shown}"
