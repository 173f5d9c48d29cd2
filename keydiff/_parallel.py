"""Model-parallel shards of one model (Meta's ``consolidated.NN.pth``): along which dim each tensor was split.

Tensor-parallel code cuts each large matrix across N ranks and saves rank r's slice in shard r: a layer whose
outputs are split cuts dim 0 of its ``[out, in]`` weight, one whose inputs are split cuts dim 1, an embedding cuts
its rows or its columns; norms and other small tensors are replicated, the same in every shard. The names do not say
which dim was cut; the sizes do. A cut dim holds full/N, every other dim a full size of the model, and the full sizes
are known from replicated vectors (a norm's length is the model's width; a length only one vector has counts last),
from ``params.json`` beside the shards, and, as tensors are decided, from each decided tensor's cut dim times N (the
hidden width of the MLP, the vocabulary).

``plan_merge`` decides every tensor from that evidence alone, never from its name: a dim is the cut when every
other dim is a known full size and its own size times N is one too; when no option has both, an option whose other
dims alone are known decides, once no stronger decision is left. What stays undecided (a square slice whose both
readings are known sizes) is an error, never a guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from keydiff._errors import CheckpointError

__all__ = ["plan_merge", "split_options"]

_REMEDY = "Merge the shards with the model's own conversion script, or give one merged file."


def split_options(shape: Sequence[int], shards: int, known: set[int]) -> tuple[list[int], list[int]]:
    """The dims a slice of ``shape`` may have been cut along: ``(strong, weak)``.

    A dim is a weak option when every other dim of the slice is a known full size, and a strong one when its own
    size times ``shards`` is a known full size too.

    Example:
        >>> split_options((16, 32), 2, {32})      # [out/2, in]: outputs split
        ([0], [0])
        >>> split_options((100, 16), 2, {16, 32, 100})  # [vocab, width/2]: embedding columns split
        ([1], [0, 1])
    """
    weak = [i for i in range(len(shape)) if all(shape[j] in known for j in range(len(shape)) if j != i)]
    strong = [i for i in weak if shape[i] * shards in known]
    return strong, weak


def plan_merge(
    names: Sequence[str],
    shapes: Sequence[Mapping[str, tuple[int, ...]]],
    *,
    identical: Callable[[str], bool],
    sizes: Iterable[int] = (),
    where: str,
) -> dict[str, int | None]:
    """Decide how to merge each tensor of N model-parallel shards: ``None`` (replicated: keep one) or the dim to
    concatenate along.

    Args:
        names: the shard files, in rank order (for messages).
        shapes: per shard, key -> shape.
        identical: whether a key's tensor holds the same values in every shard.
        sizes: full sizes known from outside the tensors (``params.json``).
        where: the path named in errors.

    Raises:
        CheckpointError: the shards hold different keys or shapes, or a tensor's split dim cannot be decided.

    Example:
        >>> shards = [{"norm": (4,), "w_in": (2, 4), "w_out": (4, 2)}] * 2
        >>> plan_merge(["a", "b"], shards, identical=lambda k: k == "norm", where="x")
        {'norm': None, 'w_in': 0, 'w_out': 1}
    """
    _check_same(names, shapes, where)
    n = len(shapes)
    known = set(sizes)
    plan: dict[str, int | None] = {}
    undecided: dict[str, tuple[int, ...]] = {}
    lengths: Counter[int] = Counter()
    for key, shape in shapes[0].items():
        if identical(key):
            plan[key] = None
            lengths.update(shape[:1] if len(shape) == 1 else ())  # a replicated vector's length is a full size
        elif len(shape) == 0:
            raise CheckpointError(where, f"scalar {key!r} differs between the shards, so they are not one model's "
                                         "model-parallel parts", _REMEDY)
        elif len(shape) == 1:
            plan[key] = 0
            known.add(shape[0] * n)
        else:
            undecided[key] = shape
    # the width is the length of many replicated vectors (every norm); a length seen once (a table of rotary
    # frequencies) is weaker evidence, used only if the rest leaves something undecided
    known.update(length for length, count in lengths.items() if count > 1)
    for extra in (set(), set(lengths)):
        known |= extra
        while undecided:
            # strong decisions first, on the sizes known at the start of the round; weak ones only when none is left
            decided = (_decide(undecided, n, set(known), strong=True)
                       or _decide(undecided, n, set(known), strong=False))
            if not decided:
                break
            for key, dim in decided.items():
                plan[key] = dim
                known.add(undecided.pop(key)[dim] * n)
    if undecided:
        key, shape = next(iter(undecided.items()))
        strong, weak = split_options(shape, n, known)
        why = ("either dim" if len(strong or weak) > 1 else "no dim") + " fits the model's full sizes"
        raise CheckpointError(
            where, f"cannot tell along which dim the {n} model-parallel shards of {key!r} (each {list(shape)}) were "
                   f"split: {why} ({', '.join(map(str, sorted(known))) or 'none known'})"
                   f"{f', and {len(undecided) - 1} more like it' if len(undecided) > 1 else ''}", _REMEDY)
    return {key: plan[key] for key in shapes[0]}


def _decide(undecided: Mapping[str, tuple[int, ...]], n: int, known: set[int], *, strong: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, shape in undecided.items():
        strong_dims, weak_dims = split_options(shape, n, known)
        dims = strong_dims if strong else weak_dims
        if len(dims) == 1 and (strong or not strong_dims):
            out[key] = dims[0]
    return out


def _check_same(names: Sequence[str], shapes: Sequence[Mapping[str, tuple[int, ...]]], where: str) -> None:
    first = shapes[0]
    for name, other in zip(names[1:], shapes[1:], strict=True):
        if other.keys() != first.keys():
            extra = sorted(set(other).symmetric_difference(first))[0]
            holder, lacker = (name, names[0]) if extra in other else (names[0], name)
            raise CheckpointError(where, f"model-parallel shards hold different tensors: {extra!r} is in {holder} "
                                         f"but not in {lacker}", _REMEDY)
        for key, shape in first.items():
            if other[key] != shape:
                raise CheckpointError(where, f"model-parallel shards disagree on the shape of {key!r}: "
                                             f"{list(shape)} in {names[0]}, {list(other[key])} in {name}", _REMEDY)
