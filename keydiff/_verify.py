"""Proof by computation: run the source model and the converted target on the same random input and compare.

Names and shapes show that a conversion loads; only running both models shows that it computes the same function.
``verify`` builds the source model (a timm name, ``package.module:callable``, or ``transformers:ModelClass`` built
from its config class), loads the checkpoint into it, converts the checkpoint with keydiff's mapping, loads the
result into the target, and compares every output of the source with the target's outputs of the same shape.
``record`` runs a model with forward hooks and keeps each module's first output, in execution order: what
``keydiff._repair`` compares module by module to find where a conversion goes wrong.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from keydiff._errors import InputError, ModelError
from keydiff._model import model_factory

if TYPE_CHECKING:
    import torch
    from torch import nn

    from keydiff._mapping import KeyMap

__all__ = ["OutputCheck", "Verification", "activation_diff", "build_source", "load_source", "record", "verify"]

DEFAULT_TOLERANCE = 1e-4
"""Largest relative difference (max abs diff / max abs value) that counts as the same output."""


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """One source output and its closest target output."""

    source: str
    shape: tuple[int, ...]
    target: str
    max_abs_diff: float | None
    rel_diff: float | None
    note: str = ""
    """Why a differing output does not count against the verdict (another output agrees, and this one is not
    computed by the target)."""


@dataclass(frozen=True, slots=True)
class Verification:
    """The result of running both models."""

    checks: tuple[OutputCheck, ...]
    input_shape: tuple[int, ...]
    tolerance: float

    @property
    def ok(self) -> bool:
        """True when some source output is reproduced by the target within the tolerance."""
        return any(c.rel_diff is not None and c.rel_diff <= self.tolerance for c in self.checks)

    def table(self) -> Any:
        """The outputs as a rich table: each source output, its closest target output and their difference."""
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"Outputs on a random input {list(self.input_shape)}", title_justify="left")
        notes = any(c.note for c in self.checks)
        for col in ("source output", "shape", "target output", "max abs diff", "rel. diff") + (
                ("does not count because",) if notes else ()):
            table.add_column(col)
        for c in self.checks:
            same = c.rel_diff is not None and c.rel_diff <= self.tolerance
            table.add_row(c.source, str(list(c.shape)), c.target or "(no output of this shape)",
                          "" if c.max_abs_diff is None else f"{c.max_abs_diff:.3g}",
                          Text("" if c.rel_diff is None else f"{c.rel_diff:.2e}",
                               style="green" if same else "dim" if c.note else "red"),
                          *((Text(c.note, style="dim"),) if notes else ()))
        return table

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        from rich.text import Text

        yield self.table()
        if self.ok:
            yield Text(f"✓ verified: the converted model reproduces the source model (relative difference ≤ "
                       f"{self.tolerance:g})", style="bold green")
        else:
            yield Text("✗ not verified: no source output is reproduced by the converted model", style="bold red")


def build_source(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build a source model with its own (random) weights, on the CPU.

    Args:
        spec: a timm model name, ``package.module:callable``, or ``transformers:ModelClass`` (built from the
            class's config with ``kwargs``).
        kwargs: keyword arguments for the factory, or the transformers config.
    """
    factory = model_factory(spec)
    try:
        model = factory(**kwargs)
    except InputError:
        raise  # a refused argument says so itself
    except Exception as exc:  # the user's model code may raise anything
        raise ModelError(f"cannot build {spec}: {type(exc).__name__}: {exc}") from exc
    if not hasattr(model, "eval"):
        raise ModelError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _call(model: nn.Module, x: torch.Tensor) -> Any:
    params = inspect.signature(model.forward).parameters
    return model(pixel_values=x) if "pixel_values" in params else model(x)


def _tensors(out: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    if isinstance(out, torch.Tensor):
        yield name, out
    elif isinstance(out, Mapping):
        for k, v in out.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from _tensors(v, f"{name}[{i}]")


def _target_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    for name, tensor in _tensors(_call(model, x), "forward"):
        outs[name] = tensor
    if hasattr(model, "forward_features"):
        feats = model.forward_features(x)
        for name, tensor in _tensors(feats, "forward_features"):
            outs[name] = tensor
        if hasattr(model, "forward_head") and not isinstance(feats, (tuple, list, dict)):
            outs["forward_head(pre_logits=True)"] = model.forward_head(feats, pre_logits=True)
            if feats.dim() == 3:
                outs["forward_features[:, 0]"] = feats[:, 0]
    return outs


def token_vocab(model: nn.Module) -> int | None:
    """The vocabulary size of a model that reads token ids (its first module with tensors is an ``nn.Embedding``:
    a language model), else None."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
        if next(module.parameters(recurse=False), None) is not None:
            return None
    return None


def input_shape_for(model: nn.Module) -> tuple[int, ...]:
    """(2, 8) token ids for a language model; (2, C, H, W) from a timm model's data config; else (2, 3, 224, 224)."""
    if token_vocab(model) is not None:
        return (2, 8)
    try:
        from timm.data import resolve_data_config

        c, h, w = resolve_data_config({}, model=model)["input_size"]
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size:
            h, w = size
        return (2, c, h, w)
    except Exception:  # not a timm model: fall back to the common image shape
        return (2, 3, 224, 224)


def load_source(source: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load the checkpoint into the source model, strictly: as stored, else after the renames the source's own
    library applies when it loads (transformers' ``from_pretrained`` renames ``encoder.layer.`` to ``layers.``...).

    Raises:
        ModelError: the checkpoint is not the source model's (missing, unexpected or misshapen keys); the message
            holds torch's whole error.
    """
    try:
        source.load_state_dict(state_dict, strict=True)
        return
    except RuntimeError as exc:
        error = exc
    renamed = _library_renames(source, state_dict)
    if renamed is not None:
        try:
            source.load_state_dict(renamed, strict=True)
            return
        except RuntimeError:
            pass  # the error as stored says more than the one after renaming
    raise ModelError(f"the checkpoint does not load into the source model: {one_line(error)}") from error


def _library_renames(source: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The checkpoint under the names the source's library loads it with, or None when it renames nothing.

    transformers (5 and later) loads files written under older names through the model's own list of renames
    (``get_model_conversion_mapping``); only the pure renames are applied here, so tensors are never changed.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(source) if isinstance(t, WeightRenaming)]
        if not renamings:
            return None
        out = {rename_source_key(k, renamings, [])[0]: v for k, v in state_dict.items()}
    except Exception:  # not a transformers model, or another transformers: nothing to rename with
        return None
    return out if len(out) == len(state_dict) and set(out) != set(state_dict) else None


def one_line(exc: BaseException) -> str:
    """An error message on one line, whole: torch's state-dict errors put every key list on a line of its own."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def random_input(shape: tuple[int, ...], seed: int = 0, vocab: int | None = None) -> torch.Tensor:
    """The input both models run on, from a seeded generator: standard normal, or token ids below ``vocab``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g) if vocab else torch.randn(shape, generator=g)


def common_vocab(*models: nn.Module) -> int | None:
    """The token ids every one of ``models`` reads (the smallest vocabulary), or None when one reads no tokens."""
    found = [token_vocab(m) for m in models]
    return None if None in found else min(found)


def verify(source: nn.Module, state_dict: Mapping[str, torch.Tensor], target: nn.Module, mapping: KeyMap, *,
           input_shape: tuple[int, ...] | None = None, tolerance: float = DEFAULT_TOLERANCE,
           seed: int = 0, partial: bool = False) -> Verification:
    """Load ``state_dict`` into ``source``, its conversion into ``target``, and compare their outputs.

    Args:
        partial: the mapping may leave target keys unfilled (they keep the target's values); otherwise the
            converted checkpoint must load strictly.

    Raises:
        ModelError: the checkpoint does not load strictly into the source, or the conversion into the target.
    """
    import torch

    load_source(source, state_dict)
    try:
        target.load_state_dict(mapping.apply(state_dict), strict=not partial)
    except RuntimeError as exc:
        raise ModelError(f"the converted checkpoint does not load into the target: {one_line(exc)}") from exc
    shape = tuple(input_shape or input_shape_for(target))
    x = random_input(shape, seed, common_vocab(source, target))
    with torch.no_grad():
        src_out = list(_tensors(_call(source.eval(), x), "output"))
        dst_out = _target_outputs(target.eval(), x)
    checks = []
    for name, a in src_out:
        if not a.is_floating_point():
            continue
        best: tuple[float, float, str] | None = None
        for tname, b in dst_out.items():
            if b.shape != a.shape:
                continue
            diff = (a - b).abs().max().item()
            rel = diff / max(a.abs().max().item(), 1e-12)
            if best is None or rel < best[0]:
                best = (rel, diff, tname)
        checks.append(OutputCheck(name, tuple(a.shape), best[2] if best else "", best[1] if best else None,
                                  best[0] if best else None))
    result = Verification(tuple(checks), shape, tolerance)
    if not result.ok:
        return result
    unused = [u.key for u in mapping.unused]
    return Verification(tuple(c if c.rel_diff is not None and c.rel_diff <= tolerance else
                              replace(c, note=_why_not_counted(c, unused)) for c in checks), shape, tolerance)


def _why_not_counted(check: OutputCheck, unused: list[str]) -> str:
    """Why an output that differs does not count, when another output agrees: the checkpoint tensors that compute
    it have no place in the target (``pooler_output`` from ``pooler.dense.*``), or the target has no such output."""
    words = set(re.findall(r"[a-z]+", check.source.lower())) - {"output", "outputs", "last", "hidden", "state"}
    used_by = [k for k in unused if words & set(re.findall(r"[a-z]+", k.lower().rpartition(".")[0]))]
    if used_by:
        shown = ", ".join(used_by[:2]) + (f" and {len(used_by) - 2} more" if len(used_by) > 2 else "")
        return f"computed from checkpoint tensors the target has no place for ({shown})"
    return "the target computes no such output (another output of the source agrees)"


Activation = tuple["torch.Tensor", ...]
"""A module's output as a flat tuple of floating-point tensors."""


class _Reached(Exception):
    """Raised from a forward hook to end a run once the module of interest has run."""


def record(model: nn.Module, x: torch.Tensor, *,
           stop: Callable[[str, Activation], bool] | None = None) -> dict[str, Activation]:
    """Run ``model`` on ``x`` and keep each named module's first output, in the order the modules finished.

    A module's hook fires when its forward returns, so a child comes before its parent; the root (``""``) is not
    recorded (its output is the model's, which ``verify`` compares). Modules called again (shared weights) keep
    their first output.

    Args:
        stop: called with each module's name and first output; when it returns True the run ends there (the rest
            of the forward pass is not needed).
    """
    import torch

    out: dict[str, Activation] = {}

    def hook(name: str) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if name in out:
                return
            out[name] = tuple(t.detach() for _, t in _tensors(output, "") if t.is_floating_point())
            if stop is not None and stop(name, out[name]):
                raise _Reached

        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            _call(model.eval(), x)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def activation_diff(a: Activation, b: Activation) -> float | None:
    """Largest relative difference (max abs diff / max abs value) between two activations; None when they cannot
    be compared (another number of tensors, other shapes, or nothing to compare)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return None
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x.numel()]
    if not pairs:
        return None
    return max((x - y).abs().max().item() / max(x.abs().max().item(), 1e-12) for x, y in pairs)
