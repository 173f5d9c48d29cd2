"""``keydiff find``: index build time, query time and memory, top-1/top-5 accuracy, and whether the first candidate
converts and reproduces the source's outputs.

    python benchmarks/find.py [--index INDEX.zip] [--build-sample 24] [--only NAME,...] [--keep DIR]

1. Index build (first run): ``python -m keydiff._index`` on a sample of timm architectures in a fresh parts file,
   extrapolated to all of ``timm.list_models()`` (the full build is the same loop, resumable; the figure from a
   full run is in the README).
2. Queries: full-size checkpoints with random weights, written to a temporary directory (never committed): timm's
   own names with other heads or sizes, torchvision, transformers and open_clip checkpoints of architectures timm
   has. ``keydiff find CKPT --json`` runs as a subprocess of its own (imports and the header read count; peak
   memory is the child's ``ru_maxrss``), with ``--verify 0`` (the index alone) and the default ``--verify 1``.
3. Conversion: ``keydiff MODEL CKPT -m ... -o OUT`` with the first candidate's name and arguments; the output must
   load strictly into ``timm.create_model(MODEL, **args)`` and give the source's outputs on one random input (both
   run in float64; relative difference below 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pairs import randomise  # tests/pairs.py, found through the path above

PY = sys.executable
# fork, exec, wait4: the child's own wall time, CPU time (user + system) and peak RSS. The machine is shared by
# several agents, so wall time includes waiting for a core; CPU time is what the query costs.
_LAUNCH = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
               os.waitstatus_to_exitcode(status)], f)
"""


@dataclass(frozen=True)
class Run:
    """One subprocess: wall and CPU seconds, peak resident memory, exit code, stderr."""

    seconds: float
    cpu: float
    peak_mb: float
    code: int
    stderr: str


def run(cmd: list[str]) -> Run:
    """Run ``cmd`` alone and measure it."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        proc = subprocess.run([PY, "-c", _LAUNCH, result.name, *cmd], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"launcher failed for {cmd}: {proc.stderr[-300:]}")
        seconds, cpu, peak_kb, code = json.loads(Path(result.name).read_text())
    return Run(seconds, cpu, peak_kb / 1024, code, proc.stderr)


def keydiff(*args: str) -> list[str]:
    """The CLI as a user runs it."""
    return [PY, "-m", "keydiff", *args]


@dataclass(frozen=True)
class Case:
    """A source model whose checkpoint the search must recognise."""

    name: str
    """What it is, for the table."""
    expected: str
    """The timm architecture it is (any name of the winning candidate's group counts)."""
    build: Callable[[], torch.nn.Module]
    """The source model (CPU, random weights)."""
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    """Its output on an image batch, the function the converted timm model must compute."""
    suffix: str = ".safetensors"


def _logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def _hf_logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=x).logits


def _timm(name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def _tv(name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(**kw)

    return build


def _hf(model_cls: str, config_cls: str, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))

    return build


def _clip_visual(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import open_clip

        visual = open_clip.create_model(name, pretrained=None).visual
        visual.proj = None  # the tower's features; the projection belongs to the joint embedding, not to timm
        return visual

    return build


CASES = [
    Case("timm resnet50, 10 classes", "resnet50", _timm("resnet50", num_classes=10), _logits),
    Case("timm convnext_tiny, head removed", "convnext_tiny", _timm("convnext_tiny", num_classes=0), _logits),
    Case("timm vit_small_patch16_224 at 384 px", "vit_small_patch16_224",
         _timm("vit_small_patch16_224", img_size=384, num_classes=37), _logits),
    Case("timm efficientnet_b0, 100 classes", "efficientnet_b0", _timm("efficientnet_b0", num_classes=100), _logits),
    Case("torchvision resnet50", "resnet50", _tv("resnet50"), _logits, ".pth"),
    Case("torchvision convnext_tiny", "convnext_tiny", _tv("convnext_tiny"), _logits, ".pth"),
    Case("torchvision vit_b_16", "vit_base_patch16_224", _tv("vit_b_16"), _logits, ".pth"),
    Case("torchvision swin_t", "swin_tiny_patch4_window7_224", _tv("swin_t"), _logits, ".pth"),
    Case("transformers ViT (10 labels)", "vit_base_patch16_224",
         _hf("ViTForImageClassification", "ViTConfig", num_labels=10, layer_norm_eps=1e-6), _hf_logits),
    Case("transformers ResNet", "resnet50", _hf("ResNetForImageClassification", "ResNetConfig", num_labels=1000),
         _hf_logits),
    Case("transformers ConvNext", "convnext_tiny",
         _hf("ConvNextForImageClassification", "ConvNextConfig", num_labels=1000, layer_norm_eps=1e-6), _hf_logits),
    Case("transformers Swin", "swin_tiny_patch4_window7_224",
         _hf("SwinForImageClassification", "SwinConfig", num_labels=1000), _hf_logits),
    Case("open_clip ViT-B-32 visual", "vit_base_patch32_clip_224", _clip_visual("ViT-B-32"), _logits),
]


def _write(case: Case, model: torch.nn.Module, where: Path) -> Path:
    path = where / (case.name.replace(" ", "_").replace(",", "").replace("/", "_") + case.suffix)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if case.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _converts(case: Case, source: torch.nn.Module, ckpt: Path, name: str, args: dict, where: Path) -> str:
    """'' when the first candidate converts and reproduces the source's outputs, else why not."""
    import timm
    from safetensors.torch import load_file

    out = where / "converted.safetensors"
    argv = [a for k, v in args.items() for a in ("-m", f"{k}={v}")]
    r = run(keydiff(name, str(ckpt), *argv, "-o", str(out), "-q"))
    if r.code != 0 or not out.exists():
        return f"keydiff exit {r.code}"
    target = timm.create_model(name, pretrained=False, **args).eval()
    try:
        target.load_state_dict(load_file(str(out)), strict=True)
    except RuntimeError as exc:
        return f"strict load: {str(exc)[:80]}"
    finally:
        out.unlink(missing_ok=True)
    size = args.get("img_size", target.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    # float64: random weights make activations grow layer by layer, and two correct implementations of the same
    # function (fused or split attention) drift apart in float32 by more than the tolerance
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        want, got = case.forward(source.double().eval(), x), target.double()(x)
    if want.shape != got.shape:
        return f"outputs {tuple(want.shape)} vs {tuple(got.shape)}"
    rel = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    return "" if rel < 1e-6 else f"outputs differ (max rel {rel:.1e})"


def _build_time(sample: int) -> tuple[Run, int, int]:
    """Building ``sample`` architectures' rows from scratch, and how many architectures timm lists."""
    import timm

    names = timm.list_models()
    step = max(1, len(names) // sample)
    chosen = names[::step][:sample]
    with tempfile.TemporaryDirectory() as tmp:
        r = run([PY, "-m", "keydiff._index", str(Path(tmp) / "sample.zip"), "--only", *chosen])
    if r.code:
        raise SystemExit(f"index build failed: {r.stderr[-500:]}")
    return r, len(chosen), len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=None, help="index archive (default: the packaged one)")
    parser.add_argument("--build-sample", type=int, default=24, help="architectures to build for the build time "
                                                                     "(0: skip)")
    parser.add_argument("--only", default="", help="comma-separated case names (substrings)")
    parser.add_argument("--keep", default=None, help="write checkpoints here and keep them")
    parser.add_argument("--no-verify-query", action="store_true", help="time only the --verify 0 query")
    opts = parser.parse_args()
    env = {"KEYDIFF_INDEX": opts.index} if opts.index else {}
    os.environ.update(env)
    torch.manual_seed(0)
    if opts.build_sample:
        r, n, total = _build_time(opts.build_sample)
        print(f"index build: {n} architectures in {r.seconds:.1f} s wall, {r.cpu:.1f} s CPU (parent only: the "
              f"workers' CPU is not in the parent's rusage) with 2 workers -> about {r.seconds / n * total / 60:.0f} "
              f"min wall for all {total} (first run)")
    where = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="keydiff-find-"))
    where.mkdir(parents=True, exist_ok=True)
    os.environ["KEYDIFF_CACHE_DIR"] = str(where / "cache")  # first runs: no model key set cached from before
    cases = [c for c in CASES if not opts.only or any(s in c.name for s in opts.only.split(","))]
    rows, top1, top5, converted = [], 0, 0, 0
    try:
        for case in cases:
            source = randomise(case.build()).eval()
            ckpt = _write(case, source, where)
            out = where / "found.json"
            fast = run(keydiff("find", str(ckpt), "--verify", "0", "--json", str(out), "-q"))
            full = fast if opts.no_verify_query else run(keydiff("find", str(ckpt), "--json", str(out), "-q"))
            doc = json.loads(out.read_text())
            groups = [c["names"] for c in doc["candidates"]]
            hit1 = bool(groups) and case.expected in groups[0]
            hit5 = any(case.expected in g for g in groups[:5])
            top1 += hit1
            top5 += hit5
            first = doc["candidates"][0] if groups else None
            why = "no candidate"
            if first is not None:
                name = first["names"][0]
                why = _converts(case, source, ckpt, name, first["args"][name], where)
            converted += not why
            args = ", ".join(f"{k}={v}" for k, v in (first["args"][first["names"][0]].items() if first else []))
            rows.append((case.name, first["names"][0] if first else "-", args or "defaults", hit1, hit5,
                         fast, full, max(fast.peak_mb, full.peak_mb), why or "converts, same outputs"))
            print(f"{case.name:40s} -> {rows[-1][1]:32s} {rows[-1][2]:28s} top1={hit1!s:5s} wall "
                  f"{fast.seconds:5.2f}s/{full.seconds:5.2f}s cpu {fast.cpu:5.2f}s/{full.cpu:5.2f}s "
                  f"{rows[-1][7]:5.0f} MB  {rows[-1][8]}", flush=True)
            ckpt.unlink()
            del source
    finally:
        if not opts.keep:
            shutil.rmtree(where, ignore_errors=True)
    n = len(rows)
    print("\n| checkpoint | first candidate | args | top-1 | query CPU s (wall s), --verify 0 / 1 | peak MB | "
          "conversion |")
    print("|---|---|---|---|---|---|---|")
    for name, first, args, hit1, _, fast, full, peak, why in rows:
        print(f"| {name} | {first} | {args} | {'yes' if hit1 else 'no'} | {fast.cpu:.2f} ({fast.seconds:.2f}) / "
              f"{full.cpu:.2f} ({full.seconds:.2f}) | {peak:.0f} | {why} |")
    cpu = sorted(r[5].cpu for r in rows)
    wall = sorted(r[5].seconds for r in rows)
    print(f"\ntop-1 {top1}/{n}, top-5 {top5}/{n}, first candidate converts and reproduces the outputs: "
          f"{converted}/{n}; query (--verify 0) median {cpu[n // 2]:.2f} s CPU, {wall[n // 2]:.2f} s wall; peak "
          f"{max(r[7] for r in rows):.0f} MB")


if __name__ == "__main__":
    main()
