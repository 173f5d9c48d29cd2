"""Wrapper prefixes: ``module.`` (DataParallel), ``_orig_mod.`` (torch.compile), ``model.`` (Lightning) and others,
found by what maximises exact matches rather than from a fixed list."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from keydiff._errors import CheckpointError

__all__ = ["Prefix", "find_prefix"]

_MAX_TOKENS = 3
_CANDIDATES = 24
_SAMPLE = 2000


@dataclass(frozen=True, slots=True)
class Prefix:
    """A rewrite of checkpoint keys: remove ``strip`` where present, then put ``add`` in front."""

    strip: str = ""
    add: str = ""
    matches: int = 0
    """Exact name matches with the rewrite."""
    baseline: int = 0
    """Exact name matches without it."""

    def apply(self, key: str) -> str:
        """The key as the model would name it."""
        if self.strip and key.startswith(self.strip):
            key = key[len(self.strip):]
        elif self.strip:
            return key
        return self.add + key

    def count(self, keys: Iterable[str], model: Collection[str]) -> int:
        """How many of ``keys`` name a model key once rewritten: ``apply`` over many keys, without a call per key.

        Example:
            >>> Prefix(strip="module.").count(["module.a", "b", "module.c"], {"a", "b"})
            2
        """
        strip, add = self.strip, self.add
        if strip:
            n = len(strip)
            return sum(1 for k in keys if (add + k[n:] if k.startswith(strip) else k) in model)
        return sum(1 for k in keys if add + k in model)


def _prefixes(keys: Sequence[str]) -> list[str]:
    counts: Counter[str] = Counter()
    for key in keys:
        tokens = key.split(".")
        for n in range(1, min(_MAX_TOKENS, len(tokens) - 1) + 1):
            counts[".".join(tokens[:n]) + "."] += 1
    return [p for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_CANDIDATES]]


def find_prefix(checkpoint_keys: Sequence[str], model_keys: Collection[str], path: str = "") -> Prefix:
    """The prefix rewrite that makes the most checkpoint keys equal to model keys.

    Raises:
        CheckpointError: the rewrite would give two checkpoint tensors the same name.

    Example:
        >>> find_prefix(["module.a.w", "module.b.w"], {"a.w", "b.w"})
        Prefix(strip='module.', add='', matches=2, baseline=0)
    """
    model = set(model_keys)
    baseline = sum(k in model for k in checkpoint_keys)
    if baseline == len(checkpoint_keys):
        return Prefix(matches=baseline, baseline=baseline)
    # score candidates on an evenly spread sample; only the winner is counted on every key
    sample = list(checkpoint_keys)[:: max(1, len(checkpoint_keys) // _SAMPLE)]
    strips, adds = _prefixes(sample), _prefixes(list(model)[:: max(1, len(model) // _SAMPLE)])
    # strip or add, not both: replacing one prefix by another is a rename, which the matcher explains better
    pairs = [(s, "") for s in strips] + [("", a) for a in adds]
    scored = [(Prefix(strip=s, add=a).count(sample, model), -len(s + a), s, a) for s, a in pairs]
    if not scored or max(scored)[0] == 0:
        return Prefix(matches=baseline, baseline=baseline)
    _, _, strip, add = max(scored)
    best = Prefix(strip=strip, add=add)
    renamed = [best.apply(k) for k in checkpoint_keys]
    # what counts is how many *model* keys the rewrite names: a block path taken for a wrapper (``layer4.2.``
    # stripped from a deeper checkpoint) renames a few keys onto names that unprefixed keys already fill
    reached = len(model.intersection(renamed))
    if reached <= baseline or reached < 0.5 * min(len(checkpoint_keys), len(model)):
        return Prefix(matches=baseline, baseline=baseline)
    best = Prefix(strip=strip, add=add, matches=reached, baseline=baseline)
    seen: dict[str, str] = {}
    for key, new in zip(checkpoint_keys, renamed, strict=True):
        if new in seen:
            if strip and sum(k.startswith(strip) for k in checkpoint_keys) < 0.5 * len(checkpoint_keys):
                # carried by a minority of the keys and colliding with the rest: a path inside the model, not a
                # wrapper around it
                return Prefix(matches=baseline, baseline=baseline)
            raise CheckpointError(
                path or "checkpoint",
                f"removing the prefix {best.strip!r} gives two tensors the same name {new!r} "
                f"({seen[new]!r} and {key!r})",
                "Pick the tensor dict to use with --key, or rename one of them.",
            )
        seen[new] = key
    return best
