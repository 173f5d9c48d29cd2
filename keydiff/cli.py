"""The ``keydiff`` command: a thin typed layer over the public API.

    keydiff MODEL CHECKPOINT [-m KEY=VALUE]... [--json MAP] [-o OUT]     diagnose, propose, convert
    keydiff apply MAP.json CHECKPOINT -o OUT                             apply a saved mapping

Exit codes: 0 every model key is filled; 1 some stay unresolved; 2 bad input or usage (one line, no traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from keydiff._errors import KeydiffError, OutputError, UsageError

__all__ = ["app", "main"]

_HELP = """Why a checkpoint does not load into a model, and the mapping that fixes it.

\b
  keydiff MODEL CHECKPOINT [-m KEY=VALUE]... [--json MAP] [-o OUT]
  keydiff apply MAP.json CHECKPOINT -o OUT

Exit codes: 0 every model key is filled; 1 some stay unresolved; 2 bad input or usage.
"""

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help=_HELP)

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
    "-o", "--output", help="Write the converted checkpoint here (safetensors), atomically.")]
Partial = Annotated[bool, typer.Option("--partial", help="Write the output even if some model keys stay unresolved.")]
ShardSize = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--max-shard-size", help="Write sharded safetensors with an index (e.g. 5GB, 500MB).")]


def _console(quiet: bool, stderr: bool = False):  # noqa: ANN202 - rich is imported lazily
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


def _write_json(path: Path, text: str, inputs: list[str]) -> None:
    import tempfile

    target = path.resolve()
    for inp in inputs:
        if Path(inp).exists() and Path(inp).resolve() == target:
            raise OutputError(f"{path}: refusing to write the mapping over an input file")
    if not target.parent.is_dir():
        raise OutputError(f"{path}: directory {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _convert(mapping, source, keys, output: Path, inputs: list[str], shard: int | None, quiet: bool) -> list[str]:  # noqa: ANN001
    from rich.progress import Progress

    from keydiff._convert import write_converted

    show = not quiet and sys.stderr.isatty()
    with Progress(transient=True, disable=not show, console=_console(quiet, stderr=True)) as progress:
        task = progress.add_task("converting", total=len(mapping.entries))
        return write_converted(mapping, source, keys, output, inputs=inputs, max_shard_size=shard,
                               tick=lambda: progress.advance(task))


@app.command("diff")
def diff_command(
    model: Annotated[str, typer.Argument(help="timm model name, package.module:callable, or a checkpoint file.")],
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, sharded index/dir, .pth/.pt/.bin/.ckpt.")],
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
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Explain why CHECKPOINT does not load into MODEL, propose a mapping, and optionally convert it."""
    from keydiff._diff import diff
    from keydiff._model import parse_model_args
    from keydiff._render._rich import render_diff

    _warn_unsafe(unsafe_pickle)
    args = parse_model_args(model_arg or [])
    shard = _size(max_shard_size)
    d = diff(model, checkpoint, key=key, unsafe_pickle=unsafe_pickle, min_confidence=min_confidence, **args)
    console = _console(quiet)
    budget = 10**9 if show_all else 40
    for part in render_diff(d, budget=budget, show_exact=show_all):
        console.print(part)
    inputs = [str(checkpoint)] + ([model] if Path(model).exists() else [])
    if json_path is not None:
        _write_json(json_path, d.mapping.dumps(), inputs)
        console.print(f"mapping written to {json_path}")
    if output is not None:
        if not d.ok and not partial:
            console.print(f"[red]no checkpoint written to {output}: {len(d.mapping.missing)} model keys are "
                          "unresolved (--partial writes the rest)[/red]")
        else:
            files = _convert(d.mapping, d.source, d.checkpoint, output, inputs, shard, quiet)
            console.print(f"converted checkpoint written to {', '.join(files)} ({len(d.mapping.entries)} tensors)")
    return 0 if d.ok else 1


@app.command("apply")
def apply_command(
    mapping: Annotated[Path, typer.Argument(help="A mapping written by keydiff --json.")],
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to convert.")],
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
    km = load_mapping(mapping)
    ckpt = read_checkpoint(checkpoint, key=key if key is not None else (km.unwrap.container or None),
                           unsafe_pickle=unsafe_pickle)
    km.check(ckpt.keys)
    files = _convert(km, ckpt, ckpt.keys, output, [str(checkpoint), str(mapping)], _size(max_shard_size), quiet)
    _console(quiet).print(f"converted checkpoint written to {', '.join(files)} ({len(km.entries)} tensors)")
    return 0


@app.command("verify")
def verify_command(
    source: Annotated[str, typer.Argument(help="Source model: timm name, package.module:callable, or "
                                               "transformers:ModelClass (built from its config).")],
    checkpoint: Annotated[Path, typer.Argument(help="The source model's checkpoint.")],
    target: Annotated[str, typer.Argument(help="Target model: timm name or package.module:callable.")],
    source_arg: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "-s", "--source-arg", metavar="KEY=VALUE", help="Keyword argument for the source model or its config.")] = None,
    model_arg: ModelArgs = None,
    mapping: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--mapping", help="Use this saved mapping instead of proposing one.")] = None,
    input_shape: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--input-shape", help="Input shape, e.g. 2,3,224,224 (default: from the target's data config).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest relative difference that passes.")] = 1e-4,
    key: ContainerKey = None,
    unsafe_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> int:
    """Prove a conversion: run the source model and the converted target on the same random input."""
    from keydiff._diff import diff
    from keydiff._mapping import load_mapping
    from keydiff._model import parse_model_args
    from keydiff._verify import build_source, verify

    _warn_unsafe(unsafe_pickle)
    shape = None
    if input_shape:
        try:
            shape = tuple(int(d) for d in input_shape.split(","))
        except ValueError:
            raise UsageError(f"--input-shape {input_shape!r} is not a list of integers like 2,3,224,224") from None
    target_args = parse_model_args(model_arg or [])
    d = diff(target, checkpoint, key=key, unsafe_pickle=unsafe_pickle, **target_args)
    km = load_mapping(mapping) if mapping else d.mapping
    console = _console(quiet)
    if not km.complete and mapping is None:
        console.print(f"[red]not verified: {len(km.missing)} target keys are unresolved; run keydiff {target} "
                      f"{checkpoint} to see why[/red]")
        return 1
    state = dict(d.source.tensors(list(d.checkpoint)))
    src_model = build_source(source, parse_model_args(source_arg or []))
    tgt_model = build_source(target, target_args)
    result = verify(src_model, state, tgt_model, km, input_shape=shape, tolerance=tolerance)
    console.print(result)
    return 0 if result.ok else 1


_COMMANDS = {"diff", "apply", "verify"}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. ``keydiff MODEL CKPT`` is short for ``keydiff diff MODEL CKPT``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in _COMMANDS and not args[0].startswith("-"):
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
    except Exception as exc:  # noqa: BLE001 - a bug: one line, and the way to report it
        if debug:
            raise
        print(f"keydiff: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)",
              file=sys.stderr)
        return 3
    return result if isinstance(result, int) else 0


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
