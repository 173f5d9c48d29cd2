"""The ``keydiff`` command: a thin typed layer over the public API.

    keydiff MODEL CHECKPOINT [-m KEY=VALUE]... [--json MAP] [-o OUT]     diagnose, propose, convert
    keydiff MODEL CHECKPOINT --source SOURCE [-s KEY=VALUE]...           ... and prove it by running both models
    keydiff apply MAP.json CHECKPOINT -o OUT                             apply a saved mapping
    keydiff stats CHECKPOINT [--csv STATS.csv]                           per-tensor statistics, NaN/Inf flagged
    keydiff find CHECKPOINT [--json OUT] [--top N]                       which timm model is it, with which arguments
    keydiff CHECKPOINT                                                   find the model, then the diff against it
    keydiff verify SOURCE CHECKPOINT TARGET                              run source and converted target

Exit codes: 0 every model key is filled and every unused checkpoint tensor is explained (with --source: and the
outputs agree); 1 some stay unresolved, tensors are left over that should have gone somewhere (extra blocks), or the
outputs differ; 2 bad input or usage (one line, no traceback).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TextIO

import typer

from keydiff._errors import KeydiffError, OutputError, UsageError

if TYPE_CHECKING:
    from keydiff._diff import Diff
    from keydiff._repair import Proof

__all__ = ["app", "main"]

_HELP = """Why a checkpoint does not load into a model, and the mapping that fixes it.

`keydiff MODEL CHECKPOINT` is the diff (short for `keydiff diff MODEL CHECKPOINT`); see `keydiff diff -h` for its
options.

\b
  keydiff MODEL CHECKPOINT [-m KEY=VALUE]... [--json MAP] [-o OUT]
  keydiff MODEL CHECKPOINT --source SOURCE [-s KEY=VALUE]...
  keydiff apply MAP.json CHECKPOINT -o OUT
  keydiff stats CHECKPOINT [--csv STATS.csv]
  keydiff find CHECKPOINT [--json OUT] [--top N]
  keydiff CHECKPOINT
  keydiff verify SOURCE CHECKPOINT TARGET

Exit codes: 0 every model key is filled and every unused checkpoint tensor is explained (with --source: and the
outputs agree); 1 some stay unresolved, tensors are left over that should have gone somewhere (extra blocks), or the
outputs differ; 2 bad input or usage.
"""

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help=_HELP,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})


def _show_version(value: bool) -> None:
    if value:
        from keydiff import __version__

        print(f"keydiff {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_show_version, is_eager=True, help="Show the version and exit.")] = False) -> None:
    pass

ModelArgs = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - typer reads Optional at runtime
    "-m", "--model-arg", metavar="KEY=VALUE",
    help="Keyword argument for timm.create_model or the callable (repeatable); values are Python literals.")]
ContainerKey = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--key", help="Which tensor dict in a training checkpoint to use (state_dict, model_ema...).")]
UnsafePickle = Annotated[bool, typer.Option(
    "--unsafe-pickle", help="Allow pickled code in torch files. Only for files you trust: it can run anything.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No report, no progress; exit code only.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks (for bug reports).")]
Output = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "-o", "--output", help="Write the converted checkpoint here, atomically: .safetensors, or a torch file "
                           "(.pt, .pth, .bin).")]
Partial = Annotated[bool, typer.Option("--partial", help="Write the output even if some model keys stay unresolved.")]
ShardSize = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--max-shard-size", help="Write sharded safetensors with an index (e.g. 5GB, 500MB).")]
Report = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--report", help="Also write the report to share: .md (GitHub markdown, for an issue) or .html (one page).")]
SourceArgs = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "-s", "--source-arg", metavar="KEY=VALUE", help="Keyword argument for the source model or its config.")]
InputShape = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--input-shape", help="Input shape, e.g. 2,3,224,224 (default: from the target's data config).")]
Tolerance = Annotated[float, typer.Option("--tolerance", help="Largest relative difference that passes.")]


def _console(quiet: bool, stderr: bool = False):
    from rich.console import Console

    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140
    return Console(stderr=stderr, width=width, quiet=quiet, highlight=False)


def _warn_unsafe(unsafe: bool) -> None:
    if unsafe:
        print("keydiff: WARNING: --unsafe-pickle lets the checkpoint run arbitrary code on this machine. "
              "Use it only for files you trust.", file=sys.stderr)


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise UsageError(f"--max-shard-size {text!r} is not a size (for example 5GB or 500MB)")


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers like 2,3,224,224") from None


def _check_output(path: Path, inputs: list[str], what: str) -> Path:
    """The resolved output path; refuses an input file and a missing directory before any work is done."""
    target = path.resolve()
    for inp in inputs:
        if Path(inp).exists() and Path(inp).resolve() == target:
            raise OutputError(f"{path}: refusing to write the {what} over an input file")
    if not target.parent.is_dir():
        raise OutputError(f"{path}: directory {target.parent} does not exist")
    if target.is_dir():
        raise OutputError(f"{path}: is a directory; name a file")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{path}: not writable here (permissions of {target.parent})")
    return target


def _check_checkpoint_output(path: Path, inputs: list[str], shard: int | None) -> None:
    """Refuse, before any work, an output whose suffix names no format keydiff writes, or that cannot be written."""
    from keydiff._convert import TORCH_OUTPUT_SUFFIXES

    name = path.name.lower()
    if name.endswith(TORCH_OUTPUT_SUFFIXES):
        if shard is not None:
            raise UsageError(f"-o {path}: --max-shard-size writes sharded safetensors; name the output "
                             "model.safetensors (a torch file is one file)")
    elif not name.endswith((".safetensors", ".index.json")) and not (shard is not None and path.is_dir()):
        raise UsageError(f"-o {path}: the suffix picks the format: .safetensors, or .pt/.pth/.bin for a torch file "
                         "(torch.save)")
    _check_output(path / "model.safetensors.index.json" if path.is_dir() else path, inputs, "converted checkpoint")


def _write_text(path: Path, text: str | Callable[[TextIO], None], inputs: list[str], what: str) -> None:
    """Write a text file atomically (temporary file, then rename), never over an input; ``text`` is the text or
    a function that writes it to the file."""
    import tempfile

    target = _check_output(path, inputs, what)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if callable(text):
                text(f)
            else:
                f.write(text)
        # mkstemp makes the file private (0600); a report or a mapping gets the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _report_format(path: Path | None) -> str | None:
    """``md`` or ``html`` from the report path's suffix; anything else is a usage error."""
    if path is None:
        return None
    fmt = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"--report {path}: the suffix picks the format: .md (GitHub markdown, to paste into an "
                         "issue) or .html (one standalone page)")
    return fmt


def _write_report(path: Path, parts: list, inputs: list[str], title: str) -> None:
    from keydiff._render import _html, _markdown

    fmt = _report_format(path)
    text = _markdown.render_markdown(parts) if fmt == "md" else _html.render_html(parts, title=title)
    _write_text(path, text, inputs, "report")


def _progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: stderr is a terminal and --quiet is off."""
    return not quiet and sys.stderr.isatty()


def _status(quiet: bool, text: str):  # -> a context manager; rich is imported lazily
    """A transient spinner on stderr for a step that can take seconds (100,000-key headers, building a model)."""
    if not _progress(quiet):
        from contextlib import nullcontext

        return nullcontext()
    return _console(quiet, stderr=True).status(text)


def _convert(mapping, source, keys, output: Path, inputs: list[str], shard: int | None, quiet: bool) -> list[str]:
    from rich.progress import Progress

    from keydiff._convert import write_converted

    gc.enable()  # tensors are read and written for a while now: let the collector run (see entry_point)
    show = not quiet and sys.stderr.isatty()
    with Progress(transient=True, disable=not show, console=_console(quiet, stderr=True)) as progress:
        task = progress.add_task("converting", total=len(mapping.entries))
        return write_converted(mapping, source, keys, output, inputs=inputs, max_shard_size=shard,
                               tick=lambda: progress.advance(task))


@app.command("diff", short_help="The default: `keydiff MODEL CHECKPOINT` explains why CHECKPOINT does not load "
                                 "into MODEL, proposes a mapping and converts it (-o).")
def diff_command(
    model: Annotated[str, typer.Argument(metavar="MODEL",
        help="timm model name, package.module:callable, transformers:ModelClass, or a checkpoint file.")],
    checkpoint: Annotated[Optional[Path], typer.Argument(metavar="[CHECKPOINT]",  # noqa: UP045
        help="Checkpoint: .safetensors, sharded index/dir, .pth/.pt/.bin/.ckpt, a Hugging Face repo id or cache "
             "folder (read from the local cache). Without it, MODEL is the checkpoint: `keydiff find` picks the "
             "model, then the diff runs against it.")] = None,
    model_arg: ModelArgs = None,
    key: ContainerKey = None,
    json_path: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--json", help="Write the mapping (entries, rules, leftovers) as JSON.")] = None,
    output: Output = None,
    partial: Partial = False,
    min_confidence: Annotated[float, typer.Option(
        "--min-confidence", min=0.0, max=1.0, help="Apply only proposals at least this confident.")] = 0.5,
    show_all: Annotated[bool, typer.Option("--all", help="List every row, exact matches included.")] = False,
    max_shard_size: ShardSize = None,
    values: Annotated[bool, typer.Option(
        "--values", help="MODEL is a checkpoint too: compare the values of every matched tensor.")] = False,
    report: Report = None,
    emit_python: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--emit-python", help="Write the mapping as a self-contained checkpoint_filter_fn(state_dict, model=None) "
                              "that needs only torch.")] = None,
    emit: Annotated[Optional[tuple[str, Path]], typer.Option(  # noqa: UP045
        "--emit", metavar="FORMAT PATH",
        help="Write the mapping for another tool: `--emit transformers key_mapping.py` (or .json) writes a "
             "key_mapping for from_pretrained(folder, key_mapping=...) when the mapping only renames (exit 1 and "
             "the entries that prevent it otherwise); `--emit python filter.py` is --emit-python.")] = None,
    source: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--source", help="The model CHECKPOINT belongs to (timm name, package.module:callable, "
                         "transformers:ModelClass): run it and the converted MODEL on one input, repair the mapping "
                         "where they differ, and exit 0 only if the outputs agree.")] = None,
    source_arg: SourceArgs = None,
    input_shape: InputShape = None,
    tolerance: Tolerance = 1e-4,
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Explain why CHECKPOINT does not load into MODEL, propose a mapping, and optionally convert it.

    With --source, prove it: exit 0 only when the converted model reproduces the source's outputs.
    """
    from keydiff._diff import diff
    from keydiff._hub import check_config_args, config_args, model_folder
    from keydiff._model import parse_model_args
    from keydiff._render._rich import render_diff
    from keydiff._sources import is_checkpoint_path

    _warn_unsafe(unsafe_pickle)
    chosen: dict[str, Any] = {}
    if checkpoint is None:
        model, checkpoint, chosen = _choose_model(model, key, unsafe_pickle, quiet)
    # transformers:ModelClass beside a checkpoint folder with config.json: that config, -m on top
    typed = parse_model_args(model_arg or [])
    check_config_args(model, typed)
    check_config_args(source or "", parse_model_args(source_arg or []))
    args = {**config_args(model, str(checkpoint)), **chosen, **typed}
    shard = _size(max_shard_size)
    inputs = [str(checkpoint)] + ([model] if Path(model).exists() else [])
    _report_format(report)
    if emit is not None and emit[0] == "python" and emit_python is None:
        emit, emit_python = None, emit[1]
    key_mapping_path = _key_mapping_path(emit, model)
    for path, what in ((json_path, "mapping"), (report, "report"), (emit_python, "generated code"),
                       (key_mapping_path, "key_mapping")):
        if path is not None:
            _check_output(path, inputs, what)
    if output is not None:
        _check_checkpoint_output(output, inputs, shard)
    model_is_file = Path(model).exists() and is_checkpoint_path(model) and model_folder(model) is None
    if values and not model_is_file:
        raise UsageError(f"--values compares the values of two checkpoints: MODEL must be a checkpoint file, got "
                         f"{model!r}")
    if source is not None and model_is_file:
        raise UsageError(f"--source runs the converted model: MODEL must be a model, not the checkpoint {model!r}")
    if (source_arg or input_shape) and source is None:
        raise UsageError("-s/--source-arg and --input-shape go with --source (the model the checkpoint belongs to)")
    with _status(quiet, f"reading {checkpoint.name} and {model}, matching keys"):
        d = diff(model, checkpoint, key=key, unsafe_pickle=unsafe_pickle, min_confidence=min_confidence, **args)
    proof = None
    if source is not None:
        proof = _prove(d, source, parse_model_args(source_arg or []), model, args, _input_shape(input_shape),
                       tolerance, quiet)
        d = proof.diff
    console = _console(quiet)
    budget = 10**9 if show_all else 40
    # the report is built only for someone to read: on screen, or in --report
    shown = not quiet or report is not None
    parts = list(render_diff(d, budget=budget, show_exact=show_all, proof=proof, partial=partial,
                             output=str(output) if output else None)) if shown else []
    if values:
        from keydiff._render._values import render_values
        from keydiff._sources import read_checkpoint
        from keydiff._values import compare_values

        reference = read_checkpoint(model, unsafe_pickle=unsafe_pickle)
        vd = compare_values(d, reference, progress=_progress(quiet))
        if shown:
            parts += render_values(vd, budget=budget)
    for part in parts:
        console.print(part)
    if report is not None:
        _write_report(report, parts, inputs, title=f"keydiff: {model} vs {checkpoint.name}")
        console.print(f"report written to {report}")
    if proof is not None and not proof.verification.ok and not partial:
        # exit 0 means right, not loads: a mapping running disproved is not written
        for path in (emit_python, json_path, output):
            if path is not None:
                console.print(f"[red]nothing written to {path}: the converted model does not reproduce the source's "
                              "outputs (--partial writes it anyway)[/red]")
        return 1
    if emit_python is not None:
        if not d.ok and not partial:
            console.print(f"[red]no code written to {emit_python}: {d.problem} (--partial writes the rest)[/red]")
        else:
            _write_text(emit_python, d.to_python(), inputs, "generated code")
            console.print(f"checkpoint_filter_fn written to {emit_python}")
    blocked = False
    if key_mapping_path is not None:
        blocked = not _emit_key_mapping(d, key_mapping_path, model, args, inputs, partial, console)
    if json_path is not None:
        _write_text(json_path, d.mapping.dump, inputs, "mapping")
        console.print(f"mapping written to {json_path}")
    if output is not None:
        if not d.ok and not partial:
            console.print(f"[red]no checkpoint written to {output}: {d.problem} (--partial writes the rest)[/red]")
        else:
            files = _convert(d.mapping, d.source, d.checkpoint, output, inputs, shard, quiet)
            console.print(f"converted checkpoint written to {', '.join(files)} ({len(d.mapping.entries)} tensors)")
    if proof is not None:
        return 0 if proof.proven and not blocked else 1
    return 0 if d.ok and not blocked else 1


def _key_mapping_path(emit: tuple[str, Path] | None, model: str) -> Path | None:
    """The ``--emit transformers PATH`` output, checked before any work: the format, the suffix, the model."""
    if emit is None:
        return None
    fmt, path = emit
    if fmt != "transformers":
        raise UsageError(f"--emit {fmt}: the formats are transformers (a key_mapping for from_pretrained) and python "
                         "(a checkpoint_filter_fn)")
    if path.suffix.lower() not in (".py", ".json"):
        raise UsageError(f"--emit transformers {path}: the suffix picks the format: .py (KEY_MAPPING = {{...}}) or "
                         ".json (key_mapping=json.load(f))")
    from keydiff._hub import library_of

    if library_of(model) != "transformers":
        raise UsageError(f"--emit transformers writes a key_mapping for a transformers model's from_pretrained; "
                         f"MODEL {model!r} is not one (use transformers:ModelClass or a transformers config folder)")
    return path


def _emit_key_mapping(d: Diff, path: Path, model: str, args: dict[str, Any], inputs: list[str], partial: bool,
                      console) -> bool:
    """Write the key_mapping, checked key by key through transformers' own loading code on the model built on the
    meta device; False (nothing written, the reason printed) when the mapping needs more than renames."""
    from keydiff import __version__
    from keydiff._model import model_factory
    from keydiff._render._transformers import emit_transformers, key_mapping

    if not d.ok and not partial:
        console.print(f"[red]no key_mapping written to {path}: {d.problem} (--partial writes the rest)[/red]")
        return True  # the diff's own exit code says it
    try:
        import torch

        with torch.device("meta"):
            target = model_factory(model)(**args)
    except Exception:  # the documented renaming semantics stand in for transformers' own code
        target = None
    km = key_mapping(d.mapping, model=target)
    if not km.ok:
        console.print(f"[red]no key_mapping written to {path}: {km.reason}. -o writes a converted checkpoint, "
                      "--emit-python code that applies the ops[/red]", soft_wrap=True)
        return False
    fmt = "json" if path.suffix.lower() == ".json" else "py"
    text = emit_transformers(km, d.mapping, fmt=fmt, version=__version__,
                             model_class=type(target).__name__ if target is not None else "")
    _write_text(path, text, inputs, "key_mapping")
    console.print(f"key_mapping written to {path} ({len(km.rules)} renames): "
                  f"from_pretrained(folder, key_mapping=...)")
    return True


def _choose_model(path: str, key: str | None, unsafe_pickle: bool, quiet: bool) -> tuple[str, Path, dict[str, Any]]:
    """``keydiff CKPT``: find the model, say which and why; returns the model, the checkpoint and its arguments."""
    from keydiff._find import find
    from keydiff._render._find import describe_choice

    if not Path(path).exists():
        raise UsageError(f"missing CHECKPOINT: keydiff MODEL CHECKPOINT, or keydiff CHECKPOINT to find its model "
                         f"({path!r} is not a file)")
    with _status(quiet, f"finding the model of {Path(path).name}"):
        found = find(path, top=3, verify=1, key=key, unsafe_pickle=unsafe_pickle)
    best = found.best
    if best is None:
        raise UsageError(f"{path}: no timm architecture resembles it; name the model: keydiff MODEL {path}")
    _console(quiet).print(describe_choice(found), style="cyan", markup=False)
    return best.name, Path(path), best.model_args()


def _prove(d: Diff, source: str, source_args: dict[str, Any], model: str, model_args: dict[str, Any],
           shape: tuple[int, ...] | None, tolerance: float, quiet: bool) -> Proof:
    """Build both models on the CPU and run them (``keydiff verify``'s code), repairing the mapping by running."""
    from keydiff._repair import prove
    from keydiff._verify import build_source

    gc.enable()  # tensors are made and freed for a while now: let the collector run (see entry_point)
    with _status(quiet, f"building {source} and {model}, running both"):
        return prove(d, build_source(source, source_args), build_source(model, model_args), input_shape=shape,
                     tolerance=tolerance, source_name=source)


@app.command("find", short_help="Which timm architecture CHECKPOINT is, with the create_model arguments its shapes "
                                 "imply, ranked.")
def find_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
        help="Checkpoint: .safetensors, sharded index/dir, .pth/.pt/.bin/.ckpt.")],
    json_path: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--json", help="Write the candidates as JSON.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many candidates to list.")] = 5,
    verify: Annotated[int, typer.Option(
        "--verify", min=0, help="Build this many of the best candidates with their arguments (meta device) and "
                                "check their keys and shapes; 0 trusts the index.")] = 1,
    key: ContainerKey = None,
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Which timm architecture CHECKPOINT is: ranked candidates with the create_model arguments its shapes imply,
    how completely each fits, and the command that converts it.

    Exit codes: 0 the best candidate fits completely; 1 none does (the closest are listed); 2 bad input.
    """
    from keydiff._find import find

    _warn_unsafe(unsafe_pickle)
    inputs = [str(checkpoint)]
    if json_path is not None:
        _check_output(json_path, inputs, "candidates")
    with _status(quiet, f"finding the model of {checkpoint.name}"):
        found = find(checkpoint, top=top, verify=verify, key=key, unsafe_pickle=unsafe_pickle)
    console = _console(quiet)
    console.print(found)
    if json_path is not None:
        _write_text(json_path, found.dumps(), inputs, "candidates")
        console.print(f"candidates written to {json_path}")
    return 0 if found.best is not None and found.best.fits else 1


@app.command("apply", short_help="Apply a saved mapping (--json) to a checkpoint and write the converted "
                                  "checkpoint.")
def apply_command(
    mapping: Annotated[Path, typer.Argument(metavar="MAP.json", help="A mapping written by keydiff --json.")],
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="The checkpoint to convert.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the converted safetensors.")],
    key: ContainerKey = None,
    max_shard_size: ShardSize = None,
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Apply a saved mapping to a checkpoint and write the converted checkpoint."""
    from keydiff._mapping import load_mapping
    from keydiff._sources import read_checkpoint

    _warn_unsafe(unsafe_pickle)
    _check_checkpoint_output(output, [str(checkpoint), str(mapping)], _size(max_shard_size))
    km = load_mapping(mapping)
    ckpt = read_checkpoint(checkpoint, key=key if key is not None else (km.unwrap.container or None),
                           unsafe_pickle=unsafe_pickle)
    km.check(ckpt.keys)
    files = _convert(km, ckpt, ckpt.keys, output, [str(checkpoint), str(mapping)], _size(max_shard_size), quiet)
    _console(quiet).print(f"converted checkpoint written to {', '.join(files)} ({len(km.entries)} tensors)")
    return 0


@app.command("verify", short_help="Run the source model and the converted target on one input: prove the "
                                   "conversion computes the same function.")
def verify_command(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="Source model: timm name, package.module:callable, or "
                                               "transformers:ModelClass (built from its config).")],
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="The source model's checkpoint.")],
    target: Annotated[str, typer.Argument(metavar="TARGET",
        help="Target model: timm name, package.module:callable or transformers:ModelClass.")],
    source_arg: SourceArgs = None,
    model_arg: ModelArgs = None,
    mapping: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--mapping", help="Use this saved mapping instead of proposing one.")] = None,
    input_shape: InputShape = None,
    tolerance: Tolerance = 1e-4,
    key: ContainerKey = None,
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Prove a conversion: run the source model and the converted target on the same random input."""
    from keydiff._diff import diff
    from keydiff._hub import check_config_args, config_args
    from keydiff._mapping import load_mapping
    from keydiff._model import parse_model_args
    from keydiff._verify import build_source, verify

    _warn_unsafe(unsafe_pickle)
    shape = _input_shape(input_shape)
    target_args = parse_model_args(model_arg or [])
    check_config_args(target, target_args)
    check_config_args(source, parse_model_args(source_arg or []))
    d = diff(target, checkpoint, key=key, unsafe_pickle=unsafe_pickle, **target_args)
    km = load_mapping(mapping) if mapping else d.mapping
    console = _console(quiet)
    if not km.complete and mapping is None:
        console.print(f"[red]not verified: {len(km.missing)} target keys are unresolved; run keydiff {target} "
                      f"{checkpoint} to see why[/red]")
        return 1
    state = dict(d.source.tensors(list(d.checkpoint)))
    src_model = build_source(source, {**config_args(source, str(checkpoint)), **parse_model_args(source_arg or [])})
    tgt_model = build_source(target, target_args)
    result = verify(src_model, state, tgt_model, km, input_shape=shape, tolerance=tolerance)
    console.print(result)
    return 0 if result.ok else 1


@app.command("stats", short_help="Per-tensor statistics of a checkpoint, NaN/Inf and all-zero tensors first.")
def stats_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT",
                                               help="Checkpoint: .safetensors, sharded, .pth/.pt/.bin/.ckpt.")],
    key: ContainerKey = None,
    csv: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--csv", help="Write every tensor's statistics as CSV.")] = None,
    report: Report = None,
    show_all: Annotated[bool, typer.Option("--all", help="List every tensor, not only the flagged ones.")] = False,
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Per-tensor statistics of CHECKPOINT (mean, std, min, max, zeros, NaN, Inf), flagged tensors first.

    Exit codes: 0 every tensor is finite; 1 some tensor holds NaN or Inf; 2 bad input.
    """
    from keydiff._render._values import render_stats
    from keydiff._sources import read_checkpoint
    from keydiff._stats import tensor_stats

    _warn_unsafe(unsafe_pickle)
    inputs = [str(checkpoint)]
    _report_format(report)
    for path, what in ((csv, "statistics"), (report, "report")):
        if path is not None:
            _check_output(path, inputs, what)
    ckpt = read_checkpoint(checkpoint, key=key, unsafe_pickle=unsafe_pickle)
    frame = tensor_stats(ckpt, ckpt.keys, progress=_progress(quiet))
    where = str(checkpoint) + (f" (tensors of `{ckpt.container}`)" if ckpt.container else "")
    parts = list(render_stats(frame, origin=where, budget=10**9 if show_all else 40, show_all=show_all))
    console = _console(quiet)
    for part in parts:
        console.print(part)
    if csv is not None:
        _write_text(csv, frame.to_csv(index=False), inputs, "statistics")
        console.print(f"statistics written to {csv}")
    if report is not None:
        _write_report(report, parts, inputs, title=f"keydiff stats: {checkpoint.name}")
        console.print(f"report written to {report}")
    return 1 if bool(((frame["nan"] > 0) | (frame["inf"] > 0)).any()) else 0


_COMMANDS = {"diff", "find", "apply", "verify", "stats"}
_ROOT_OPTIONS = {"--version", "-V", "-h", "--help", "--install-completion", "--show-completion"}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. ``keydiff MODEL CKPT`` is short for ``keydiff diff MODEL CKPT``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in _COMMANDS and args[0] not in _ROOT_OPTIONS:
        args.insert(0, "diff")
    debug = "--debug" in args or os.environ.get("KEYDIFF_DEBUG") == "1"
    try:
        result = app(args, prog_name="keydiff", standalone_mode=False)
    except KeydiffError as exc:
        if debug:
            raise
        print(f"keydiff: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("keydiff: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors from the argument parser
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(message)
            return 2
        print(f"keydiff: error: {message} (see keydiff --help)", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        print(f"keydiff: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line, and the way to report it
        if debug:
            raise
        print(f"keydiff: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)",
              file=sys.stderr)
        return 3
    return result if isinstance(result, int) else 0


def entry_point() -> None:
    """Console-script entry point."""
    # A run allocates millions of small acyclic objects (a 100,000-key header is 400,000 of them, a mapping as
    # many again) that reference counting frees; scanning them for cycles is a tenth of a 100k-key run. The cycle
    # collector stays off while keys are compared and comes back, rarely, for the tensor work (see _convert).
    gc.disable()
    gc.set_threshold(100_000, 50, 1000)
    code = main()
    # Every output is written and closed by now. Tearing down the interpreter would free those millions
    # of objects one by one (a tenth of a 100k-key run) for nothing: flush what is printed and leave at once.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (keydiff ... | head): nothing to add
            stream.flush()
    os._exit(code)
