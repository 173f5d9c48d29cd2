"""A model's dataflow: one forward pass on the meta device, watched op by op, says in which order the model consumes
its tensors and which tensor-owning module feeds which.

Registration order (the state dict's) is how the code declares modules, not how they run: a norm declared at the
end of ``__init__``, a ``cls_token`` declared first and used after the patch embedding. A
``torch.overrides.TorchFunctionMode`` sees every op and its arguments, so it sees the moment a parameter meets the
data (whether or not its module's ``forward`` runs: fused attention passes ``qkv.weight`` straight to
``F.linear``), and follows the data between modules:

- a tensor computed from the model's input or from other activations carries its *producers*, the tensor-owning
  modules whose output it was computed from, each stamped with when it produced;
- a tensor computed from parameters alone (``weight.view(...)``, ``cat((q_bias, zeros, v_bias))``) carries the keys
  it derives from;
- an op that combines the two (or keys with a constant: position ids, a relative-position index) consumes those
  keys, records an edge from every producer to every owner of the keys, and its output's producers become those
  owners (plus the data's producers, for an addition or a concatenation: ``x + pos_embed``).

Nothing is allocated: the model's tensors are on the meta device, and so is the input. The trace never raises: a
forward that fails (an input it does not accept, a data-dependent op on meta) or runs past its budget gives the
registration order with ``ran=False`` and the reason in words.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from typing import TYPE_CHECKING, Any

from keydiff._keys import Dataflow, owner_of

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["MAX_OPS", "TRACE_BUDGET", "WALL_FACTOR", "example_inputs", "meta_copy", "trace_dataflow"]

TRACE_BUDGET = 2.0
"""CPU seconds one trace may take (all candidate inputs together); past it the trace stops and reports why. CPU time
of the tracing thread, not wall time: on a loaded machine the same model gets the same answer, and the answer is
cached. A wall-clock backstop of ``WALL_FACTOR`` times the budget catches a forward that waits instead of computing."""
WALL_FACTOR = 10
"""The wall-clock backstop, in budgets."""
MAX_OPS = 200_000
"""Ops one trace may watch, a bound that does not depend on the machine's speed."""
MAX_CANDIDATES = 4
"""Example inputs tried, at most, before giving up on running the model."""

Example = tuple[str, tuple[Any, ...], dict[str, Any]]
"""A candidate input: its description, positional and keyword arguments."""


class _Stop(BaseException):
    """The trace ran out of budget (a ``BaseException``, so that no ``except Exception`` in model code swallows it)."""


def trace_dataflow(model: nn.Module, example: Any = None, *, budget: float = TRACE_BUDGET) -> Dataflow:
    """Run ``model`` once on the meta device and record the order it consumes its tensors in and what feeds what.

    Args:
        model: the module. When its tensors are on the meta device it runs itself (in eval mode, given back in the
            mode it had, with the trace's hooks removed); otherwise a ``meta_copy`` runs, and the model's memory is
            never touched.
        example: the input: a tensor, a tuple of positional arguments or a dict of keyword arguments (moved to the
            meta device). Default: derived from the model (``example_inputs``), the first candidate that runs.
        budget: CPU seconds the trace may take before it stops (with ``ran=False``).

    Returns:
        The dataflow; never raises. ``ran=False`` (registration order, no edges) when no input ran.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> flow = trace_dataflow(net)
        >>> flow.ran, flow.order, flow.feeds
        (True, ('0', '2'), (('0', '2'),))
    """
    try:
        import torch

        state = model.state_dict(keep_vars=True)
        keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    except Exception as exc:  # a user's state_dict hook may raise anything
        return Dataflow.from_registration((), reason=f"not run: no state dict ({_say(exc)})")
    try:
        if any(state[k].device.type != "meta" for k in keys):
            twin = meta_copy(model)
            if twin is None:
                return Dataflow.from_registration(keys, reason="not run: the model is not on the meta device and "
                                                               "cannot be copied there")
            model, state = twin, twin.state_dict(keep_vars=True)
        with _no_meta_left_in_caches(model):
            return _trace(model, state, keys, example, budget)
    except Exception as exc:  # the trace is evidence, never a failure of the diff
        return Dataflow.from_registration(keys, reason=f"not run: {_say(exc)}")


@contextlib.contextmanager
def _no_meta_left_in_caches(model: nn.Module) -> Iterator[None]:
    """Afterwards, clear the ``functools.lru_cache``s of the packages the model's modules come from (torch's aside).

    Model code caches tensors it builds from sizes (transformers' BEiT caches its relative position index per
    window size): filled while running on the meta device, such a cache would hand meta or uninitialised tensors to
    the next real forward of that model in this process (``--source``, a notebook), which then computes something
    else. Clearing an lru cache only costs a recomputation. The caches are found by one scan of the collector's
    objects (about 0.1 s, on a first build only).
    """
    import functools
    import gc

    # torch's own caches are keyed by device and dtype; the model code's are keyed by sizes
    packages = {type(m).__module__.partition(".")[0] for m in model.modules()} - {"torch"}
    try:
        yield
    finally:
        with warnings.catch_warnings():  # looking at a deprecated object (torch.distributed.reduce_op) warns
            warnings.simplefilter("ignore")
            for c in gc.get_objects():
                if isinstance(c, functools._lru_cache_wrapper) and c.cache_info().misses and \
                        getattr(c, "__module__", "").partition(".")[0] in packages:
                    c.cache_clear()


def _trace(model: nn.Module, state: Mapping[str, Any], keys: list[str], example: Any, budget: float) -> Dataflow:
    tensors: dict[int, list[str]] = {}
    for k in keys:
        tensors.setdefault(id(state[k]), []).append(k)
    candidates = [_as_example(example)] if example is not None else example_inputs(model)
    if not candidates:
        return Dataflow.from_registration(keys, reason="not run: no example input could be derived from the model")
    _warm_up()
    deadline = (time.thread_time() + budget, time.perf_counter() + WALL_FACTOR * budget)
    failures: list[str] = []
    for label, args, kwargs in candidates[:MAX_CANDIDATES]:
        tracer = _Tracer(tensors, deadline, budget)
        try:
            with _watching(model, tracer.stack), tracer:
                tracer.start(args, kwargs)
                model(*args, **kwargs)
        except _Stop as stop:
            return Dataflow.from_registration(keys, reason=f"not run to the end: {stop} (on {label})")
        except Exception as exc:  # the model's own code fails on this input, or on the meta device
            failures.append(f"{label}: {_say(exc)}")
            continue
        return tracer.result(keys, reason=f"ran on {label}")
    return Dataflow.from_registration(keys, reason="forward failed on the meta device; " + "; ".join(failures))


def _warm_up() -> None:
    """Import what meta kernels written in Python import on their first call, before the budget's clock starts."""
    # torch's Python decompositions import torch._dynamo (and sympy) lazily: seconds, once per process, and already
    # paid whenever timm is imported. A cost of the process, not of the model.
    with suppress(ImportError):
        import torch._dynamo  # noqa: F401


def _say(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextmanager
def _watching(model: nn.Module, stack: list[str]) -> Iterator[None]:
    """Eval mode, no autograd, no warnings, meta as the default device, and a stack of the modules running (to tell
    tied keys apart)."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    with ExitStack() as undo:
        undo.callback(lambda: [setattr(m, "training", t) for m, t in modes])  # each module's own flag back
        model.eval()
        undo.enter_context(torch.no_grad())
        undo.enter_context(torch.device("meta"))  # torch.ones(n, n) in a forward: on meta too, like the weights
        undo.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for path, module in model.named_modules(remove_duplicate=False):
            undo.callback(module.register_forward_pre_hook(lambda *_, p=path: stack.append(p)).remove)
            undo.callback(module.register_forward_hook(lambda *_: _pop(stack), always_call=True).remove)
        yield


def _pop(stack: list[str]) -> None:
    stack.pop()  # and return None: a forward hook that returns a value replaces the module's output


_MERGES = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
                     "__isub__", "cat", "concat", "concatenate", "stack", "hstack", "vstack"})
"""Ops whose output carries their inputs through (``x + pos_embed``, ``cat((cls_token, x))``), unlike a linear map."""


class _Tracer:
    """The op-by-op bookkeeping; entered as a ``TorchFunctionMode``."""

    def __init__(self, tensors: Mapping[int, list[str]], deadline: tuple[float, float], budget: float) -> None:
        import torch
        from torch.overrides import TorchFunctionMode
        from torch.utils._pytree import tree_leaves

        self.tensors = tensors
        """id of each state tensor -> its keys (several when tied)."""
        self.deadline = deadline
        """(CPU, wall) times past which the trace stops."""
        self.budget = budget
        self.stack: list[str] = []
        self.keep: list[torch.Tensor] = []  # every tensor seen stays alive, so no id() is reused during the trace
        self.producers: dict[int, dict[str, int]] = {}
        """Activation tensor id -> {producing module: when it produced}."""
        self.derived: dict[int, frozenset[str]] = {}
        """Parameter-derived tensor id -> the keys it was computed from."""
        self.consumed: dict[str, int] = {}
        self.touched: dict[str, int] = {}
        self.edges: dict[tuple[str, str], int] = {}
        self.clock = 0
        self._leaves = tree_leaves
        self._tensor = torch.Tensor
        self._setitem = torch.Tensor.__setitem__
        tracer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                tracer.check()  # before the op: one op can be long (a recurrent layer)
                out = func(*args, **(kwargs or {}))
                tracer.op(func, args, kwargs or {}, out)
                return out

        self.mode = Mode()

    def check(self) -> None:
        """Stop the trace when its budget is spent."""
        cpu, wall = self.deadline
        if time.thread_time() > cpu:
            raise _Stop(f"the trace took more than its budget of {self.budget:g} CPU seconds")
        if time.perf_counter() > wall:
            raise _Stop(f"the trace took more than {WALL_FACTOR * self.budget:g} s")

    def __enter__(self) -> _Tracer:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Mark the model's inputs as activations with no producer."""
        for t in self._tensors((args, kwargs)):
            self.producers[id(t)] = {}
            self.keep.append(t)

    def _tensors(self, tree: Any) -> list[torch.Tensor]:
        return [x for x in self._leaves(tree) if isinstance(x, self._tensor)]

    def _key(self, keys: list[str]) -> str:
        """Which of a tied tensor's keys is being used: the one whose module is running, innermost first."""
        if len(keys) > 1:
            for path in reversed(self.stack):
                for k in keys:
                    if owner_of(k) == path:
                        return k
        return keys[0]

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Propagate producers and parameter keys from an op's inputs to its outputs."""
        if func is self._setitem:  # x[i] = v writes into x: x now also depends on v
            outputs = [args[0]]
        else:
            outputs = self._tensors(out)
            if not outputs:
                return  # .shape, .dim(), .item(): metadata, not a use of the tensor's values
        self.clock += 1
        if self.clock > MAX_OPS:
            raise _Stop(f"more than {MAX_OPS} ops")
        producers: dict[str, int] = {}
        keys: set[str] = set()
        data = False  # an input is an activation (the model's input counts, with no producer)
        other = False  # an input is neither an activation nor a weight: a constant, a non-persistent buffer
        for t in self._tensors((args, kwargs)):
            i = id(t)
            if i in self.tensors:
                key = self._key(self.tensors[i])
                keys.add(key)
                self.touched.setdefault(key, self.clock)
            elif i in self.derived:
                keys.update(self.derived[i])
            elif i in self.producers:
                data = True
                for p, when in self.producers[i].items():
                    if producers.get(p, -1) < when:
                        producers[p] = when
            else:
                other = True
        if not keys:
            if data:
                self._mark(outputs, producers=producers)
            return  # from constants alone: a constant, no producer and no key
        if not data and not other:  # weights rearranged (weight.view, cat of biases, expand): not consumed yet
            self._mark(outputs, derived=frozenset(keys))
            return
        # the weights meet the data (or a constant: position ids, a relative-position index): their owners consume
        owners = {owner_of(k) for k in keys}
        for k in keys:
            self.consumed.setdefault(k, self.clock)
        for p, when in producers.items():
            for o in owners:
                if p != o and self.edges.get((p, o), -1) < when:
                    self.edges[(p, o)] = when
        # the output is the owners' output; an addition or a concatenation also passes the data's producers on
        merged = producers if getattr(func, "__name__", "") in _MERGES else {}
        self._mark(outputs, producers={**merged, **dict.fromkeys(owners, self.clock)})

    def _mark(self, outputs: list[torch.Tensor], *, producers: dict[str, int] | None = None,
              derived: frozenset[str] | None = None) -> None:
        for t in outputs:
            i = id(t)
            if i in self.tensors:
                continue  # an op that returns a parameter itself (requires_grad_) leaves it a parameter
            self.keep.append(t)
            if derived is not None:
                self.derived[i] = derived
                self.producers.pop(i, None)
            else:
                self.producers[i] = producers or {}
                self.derived.pop(i, None)

    def result(self, keys: list[str], *, reason: str) -> Dataflow:
        """The dataflow seen: keys by first consumption, unused keys after their registration predecessor."""
        # consumed together (one op): first touched first (the biases cat-ed before the op), then state-dict order
        first = {k: (self.consumed.get(k, self.touched.get(k)), self.touched.get(k, 0), n) for n, k in enumerate(keys)}
        used = sorted((k for k in keys if first[k][0] is not None), key=first.__getitem__)
        unused = [k for k in keys if first[k][0] is None]
        order = _insert_after_predecessor(used, unused, keys)
        modules = tuple(dict.fromkeys(map(owner_of, order)))
        rank = {m: i for i, m in enumerate(modules)}
        feeds = sorted(self.edges.items(), key=lambda e: (rank.get(e[0][1], len(rank)), -e[1], e[0][0]))
        return Dataflow(ran=True, reason=reason, param_order=tuple(order), order=modules,
                        feeds=tuple(edge for edge, _ in feeds), unused=tuple(unused))


def _insert_after_predecessor(used: list[str], unused: list[str], keys: list[str]) -> list[str]:
    """``used`` in its order, each unused key placed right after the key registered before it."""
    if not unused:
        return used
    after: dict[str | None, list[str]] = {}
    placed: str | None = None
    skipped = set(unused)
    for k in keys:
        if k in skipped:
            after.setdefault(placed, []).append(k)
        placed = k if k not in skipped else placed
    out = list(after.get(None, []))
    for k in used:
        out.append(k)
        out.extend(after.get(k, []))
    return out


# ------------------------------------------------------------------------------------------------ example inputs

def example_inputs(model: nn.Module) -> list[Example]:
    """Candidate inputs for ``model``, on the meta device, most likely first (at most ``MAX_CANDIDATES``).

    From, in turn: a configuration's main input (``main_input_name`` with ``image_size`` and ``num_channels``, or
    token ids), the image sizes the model declares (an ``img_size`` or ``image_size`` attribute,
    ``pretrained_cfg["input_size"]``), and the first module that owns tensors (a convolution takes an image or a
    signal, an embedding token ids, a linear layer a vector of its width; the first three such modules take turns, as
    the first registered need not be the first to run). Batch 1, small sizes.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> [label for label, _, _ in example_inputs(net)]
        ['float32[1, 3, 224, 224]', 'float32[1, 3, 256, 256]']
    """
    import torch

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    found: dict[str, Example] = {}
    for example in _configured(model, dtype):
        found.setdefault(*_keyed(example))
    sizes = _declared_sizes(model)
    channels = _declared_channels(model)
    if channels is not None:  # an image the model declares, even when its first layer is no plain convolution
        for hw in sizes:
            found.setdefault(*_keyed(_example(_meta((1, channels, *hw), dtype))))
    # registration order need not be execution order: the first few tensor-owning modules take turns
    per_module = [list(_from_module(m, sizes, dtype)) for m in _first_owners(model, 3)]
    for turn in range(max(map(len, per_module), default=0)):
        for candidates in per_module:
            if turn < len(candidates):
                found.setdefault(*_keyed(candidates[turn]))
    return list(found.values())[:MAX_CANDIDATES]


def _keyed(example: Example) -> tuple[str, Example]:
    return example[0], example


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    import torch

    return torch.zeros(shape, dtype=dtype, device="meta")


def _label(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    def one(t: Any) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]" if hasattr(t, "shape") \
            else repr(t)

    return ", ".join([*map(one, args), *(f"{k}={one(v)}" for k, v in kwargs.items())])


def _example(*args: Any, **kwargs: Any) -> Example:
    return _label(args, kwargs), args, kwargs


def _as_example(example: Any) -> Example:
    import torch

    def meta(x: Any) -> Any:
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    if isinstance(example, Mapping):
        return _example(**{k: meta(v) for k, v in example.items()})
    if isinstance(example, tuple):
        return _example(*map(meta, example))
    return _example(meta(example))


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def _configured(model: nn.Module, dtype: torch.dtype) -> Iterator[Example]:
    """The inputs a configuration names: ``main_input_name`` (with ``decoder_input_ids`` for an encoder-decoder),
    then every input the forward accepts that the configuration sizes (text and image together, for instance)."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or not isinstance(main, str):
        return
    try:
        accepted = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        accepted = {main}
    made = {name: t for name in _CONFIG_INPUTS if name in accepted or name == main
            if (t := _config_input(name, config, dtype)) is not None}
    if main not in made:
        return
    first = {main: made[main]}
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in made:
        first["decoder_input_ids"] = made["decoder_input_ids"]
    yield _example(**first)
    if made.keys() != first.keys():
        yield _example(**made)


_CONFIG_INPUTS = ("input_ids", "pixel_values", "input_values", "input_features", "decoder_input_ids")
"""Inputs a configuration can size, in the order they are passed."""


def _config_input(name: str, config: Any, dtype: torch.dtype) -> torch.Tensor | None:
    import torch

    if name in ("input_ids", "decoder_input_ids"):
        return _meta((1, 16 if name == "input_ids" else 8), torch.long)
    if name == "pixel_values":
        hw = _pair(_config_value(config, "image_size")) or (224, 224)
        return _meta((1, int(_config_value(config, "num_channels") or 3), *hw), dtype)
    if name == "input_values":
        return _meta((1, 16000), dtype)
    if name == "input_features":  # mel frames: as many as the encoder's positions take after its stride-2 conv
        positions = _config_value(config, "max_source_positions")
        frames = 2 * positions if isinstance(positions, int) else 3000
        return _meta((1, int(_config_value(config, "num_mel_bins") or 80), frames), dtype)
    return None


def _config_value(config: Any, attr: str) -> Any:
    """``config.attr``, else the first sub-configuration's (``vision_config.image_size``)."""
    value = getattr(config, attr, None)
    if value is not None:
        return value
    for name in sorted(vars(config)) if hasattr(config, "__dict__") else ():
        sub = getattr(config, name, None)
        if name.endswith("_config") and sub is not None and getattr(sub, attr, None) is not None:
            return getattr(sub, attr)
    return None


def _declared_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Image sizes the model states: an ``img_size``/``image_size`` attribute, then ``pretrained_cfg``."""
    sizes: list[tuple[int, int]] = []
    for module in model.modules():
        for attr in ("img_size", "image_size"):
            hw = _pair(getattr(module, attr, None))
            if hw is not None and hw not in sizes:
                sizes.append(hw)
        if sizes:
            break
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if isinstance(size, (tuple, list)) and len(size) == 3:
            hw = _pair(tuple(size[1:]))
            if hw is not None and hw not in sizes:
                sizes.append(hw)
    return sizes


def _declared_channels(model: nn.Module) -> int | None:
    """Image channels the model states (``pretrained_cfg["input_size"][0]``, ``in_chans``), else those of its
    first 2-d convolution."""
    from torch import nn

    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if isinstance(size, (tuple, list)) and len(size) == 3 and isinstance(size[0], int) and size[0] > 0:
            return size[0]
    for attr in ("in_chans", "in_channels", "num_channels"):
        with warnings.catch_warnings():  # diffusers warns on config attributes read off the model
            warnings.simplefilter("ignore")
            value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _first_owners(model: nn.Module, count: int) -> list[nn.Module]:
    """The first modules, in registration order, with parameters of their own and no children."""
    found: list[nn.Module] = []
    for module in model.modules():
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
            found.append(module)
            if len(found) == count:
                break
    return found


def _from_module(module: nn.Module, sizes: list[tuple[int, int]], dtype: torch.dtype) -> Iterator[Example]:
    import torch
    from torch import nn

    if isinstance(module, nn.Conv2d):
        for hw in [*sizes, (224, 224), (256, 256)]:
            yield _example(_meta((1, module.in_channels, *hw), dtype))
    elif isinstance(module, nn.Conv1d):
        yield _example(_meta((1, module.in_channels, 256), dtype))
    elif isinstance(module, nn.Conv3d):
        yield _example(_meta((1, module.in_channels, 16, 112, 112), dtype))
    elif isinstance(module, nn.Embedding):
        yield _example(_meta((1, 16), torch.long))
    elif isinstance(module, nn.Linear):
        yield _example(_meta((1, module.in_features), dtype))
        yield _example(_meta((1, 16, module.in_features), dtype))
    elif isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) and module.normalized_shape:
        yield _example(_meta((1, 16, *module.normalized_shape), dtype))


# ------------------------------------------------------------------------------------------------ meta copies

def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose tensors are on the meta device, without copying any tensor data; None when the
    module cannot be copied (it holds something ``deepcopy`` refuses). Tied tensors stay tied.

    Example:
        >>> import torch
        >>> meta_copy(torch.nn.Linear(2, 3)).weight.device.type
        'meta'
    """
    import torch

    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else empty
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # user modules may hold locks, files, generators
        return None
