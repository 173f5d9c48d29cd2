"""The model side: a timm name or a ``package.module:callable``, built on the meta device (nothing allocated,
nothing downloaded), read as a ``KeySet`` of its state dict (persistent buffers included) that carries the model's
dataflow (``keydiff._dataflow``: one forward pass on the meta device), its layout (``keydiff._layouts``) and its
tied keys (``keydiff._ties``)."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from keydiff._errors import InputError, ModelError, UsageError
from keydiff._keys import Dataflow, KeySet, TensorInfo

if TYPE_CHECKING:
    from torch import nn

__all__ = ["keyset_of", "model_factory", "parse_model_args", "read_model"]


def parse_model_args(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are Python literals when they parse as one, else strings.

    Example:
        >>> parse_model_args(["num_classes=0", "act_layer=quick_gelu", "dims=(16, 32)", "eps=1e-5"])
        {'num_classes': 0, 'act_layer': 'quick_gelu', 'dims': (16, 32), 'eps': 1e-05}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"model argument {item!r} is not KEY=VALUE (for example -m num_classes=0)")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def keyset_of(state: Mapping[str, Any] | nn.Module, origin: str = "") -> KeySet:
    """A ``KeySet`` of a module's state dict or of a mapping of tensors, in its order.

    A module's key set carries its dataflow, traced on a meta copy (the module itself does not run, and no tensor
    data is copied); a mapping's carries none.
    """
    if hasattr(state, "state_dict") and callable(state.state_dict):
        from keydiff._dataflow import meta_copy, trace_dataflow
        from keydiff._ties import model_ties

        keys = _keys_of(state.state_dict(), origin)
        copy = meta_copy(state)
        flow = trace_dataflow(copy) if copy is not None else Dataflow.from_registration(
            keys, reason="not run: the module cannot be copied to the meta device")
        from keydiff._layouts import read_layout

        return replace(keys, flow=flow, layout=read_layout(copy if copy is not None else state),
                       ties=model_ties(state, list(keys)))
    return _keys_of(state, origin)


def _keys_of(sd: Mapping[str, Any], origin: str) -> KeySet:
    items = [
        (k, TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")))
        for k, v in sd.items()
        if hasattr(v, "shape") and hasattr(v, "dtype")
    ]
    return KeySet.from_items(items, origin=origin, order_is_evidence=True)


def _build(factory: Any, kwargs: dict[str, Any], spec: str) -> nn.Module:
    import torch

    try:
        with torch.device("meta"):
            return factory(**kwargs)
    except InputError:
        raise  # a refused argument says so itself
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build {spec} with arguments {kwargs}: {exc}") from exc
    except Exception:  # some init code does not run on the meta device: try the CPU
        pass
    try:
        return factory(**kwargs)
    except Exception as exc:  # the user's model code may raise anything
        raise ModelError(f"cannot build {spec}: {type(exc).__name__}: {exc}") from exc


def model_factory(spec: str) -> Callable[..., nn.Module]:
    """What builds the model a spec names, called with the model's keyword arguments.

    Args:
        spec: a timm model name, ``package.module:callable``, ``transformers:ModelClass`` (keyword arguments
            then go to the class's config), ``diffusers:ModelClass`` (keyword arguments are its config), or a
            folder with a ``config.json`` (timm, transformers or diffusers).

    Raises:
        ModelError: unknown timm name (close names are suggested), or the module or class cannot be imported.
    """
    from keydiff._hub import LIBRARIES, folder_factory, library_factory, model_folder

    folder = model_folder(spec)
    if folder is not None:  # a folder with config.json, a Hugging Face cache folder or repo id, hf-hub:org/name
        return folder_factory(folder)
    library, _, name = spec.partition(":")
    if library in LIBRARIES:
        return library_factory(library, name)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"cannot import {spec}: {exc}") from exc
    import timm

    if not timm.is_model(spec):
        raise ModelError(f"unknown timm model {spec!r}{_suggest(spec)}")
    return lambda **kw: timm.create_model(spec, **{"pretrained": False, **kw})


def read_model(spec: str, model_args: Mapping[str, Any] | None = None) -> KeySet:
    """Build a model from its spec on the meta device and read its keys, with its dataflow (``KeySet.flow``).

    Args:
        spec: a timm model name (``vit_base_patch16_224``), ``package.module:callable`` returning an
            ``nn.Module``, or ``transformers:ModelClass``.
        model_args: keyword arguments for ``timm.create_model``, the callable, or the transformers config.

    Raises:
        ModelError: unknown name (close names are suggested), import failure, or the model fails to build.
    """
    kwargs = dict(model_args or {})
    from keydiff._hub import model_folder

    timm_name = ":" not in spec and model_folder(spec) is None
    if timm_name:
        from keydiff._cache import load_model_keys

        # a timm model seen before: its keys come from the cache, and neither torch nor timm is imported
        cached = load_model_keys(spec, kwargs)
        if cached is not None:
            return cached
    model = _build(model_factory(spec), kwargs, spec)
    if not hasattr(model, "state_dict"):
        raise ModelError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    from keydiff._dataflow import trace_dataflow
    from keydiff._layouts import read_layout
    from keydiff._ties import model_ties

    keys = _keys_of(model.state_dict(), spec)
    # the ties are read before the trace runs the model (ours: it runs, twice: its dataflow, then how it lays out
    # its weights and rotations)
    keys = replace(keys, ties=model_ties(model, list(keys)), flow=trace_dataflow(model), layout=read_layout(model))
    if timm_name:
        from keydiff._cache import store_model_keys

        store_model_keys(spec, kwargs, keys)
    return keys


def _suggest(name: str) -> str:
    import timm
    from rapidfuzz import process

    close = [m for m, score, _ in process.extract(name, timm.list_models(), limit=3) if score >= 60]
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"


DEPTH_ARGS = ("depth", "depths", "layers", "num_layers", "num_hidden_layers", "n_layer", "n_layers", "num_blocks")
"""Keyword arguments that set a model's depth, as timm, torchvision and transformers name them."""


def depth_argument(spec: str, model_args: Mapping[str, Any], counts: list[int]) -> str | None:
    """The ``KEY=VALUE`` model argument that gives the model ``counts`` blocks per container, or None.

    An argument the user already passed wins (its form, a number or a list, is kept); otherwise the model's own
    signature (or its config's attributes) says which depth argument it takes. Builds nothing when the user's
    arguments decide.

    Example:
        >>> depth_argument("vit_tiny_patch16_224", {"depth": 2}, [4])
        'depth=4'
    """
    for name in DEPTH_ARGS:
        if name in model_args:
            return _depth_value(name, model_args[name], counts)
    try:
        accepted = _accepted_args(spec)
    except Exception:  # any failure to look: no hint rather than a wrong one
        return None
    for name in DEPTH_ARGS:
        if name in accepted:
            return _depth_value(name, accepted[name], counts)
    return None


def _depth_value(name: str, current: Any, counts: list[int]) -> str | None:
    if isinstance(current, (list, tuple)) or len(counts) > 1:
        if isinstance(current, (list, tuple)) and len(current) != len(counts):
            return None
        return f"{name}={list(counts)}"
    return f"{name}={counts[0]}"


def _accepted_args(spec: str) -> dict[str, Any]:
    """Keyword arguments the spec's model accepts, with their defaults (None when there is none)."""
    import inspect

    factory = model_factory(spec)
    if spec.startswith("diffusers:"):
        import diffusers

        factory = getattr(diffusers, spec.partition(":")[2])
    elif spec.startswith("transformers:"):
        import transformers

        config = getattr(transformers, spec.partition(":")[2]).config_class()
        return {k: v for k, v in vars(config).items() if not k.startswith("_")}
    elif ":" not in spec:
        import torch

        with torch.device("meta"):
            factory = type(factory())
    target = factory.__init__ if inspect.isclass(factory) else factory
    params = inspect.signature(target).parameters.values()
    return {p.name: None if p.default is inspect.Parameter.empty else p.default for p in params}
