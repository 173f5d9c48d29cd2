"""Scale and speed: four figures, each a ratio measured in the same run.

    python benchmarks/bench.py [--layers 64 --experts 512] [--vit ...] [--big-vit ...]
                               [--only keys,deep,unclean,big,convert,startup]

1. Key scale: a ~100,000-key mixture-of-experts pair (Hugging Face Mixtral names against the original Mistral
   names); ``keydiff original.safetensors hf.safetensors --json map.json`` against a bare script that only reads both
   headers, and how many keys the mapping gets right. Three layouts of about the same size: ``keys`` (64 layers x
   512 experts: wide folds), ``deep`` (128 layers x 256 experts: twice the folds, each half as wide) and
   ``unclean`` (the ``keys`` pair with one expert tensor missing from the checkpoint: the folded answer is not
   clean, so the full engine runs on every key, and exactly one model key must stay unresolved).
2. Big tensors: ``keydiff MODEL CKPT`` against the usual route (``load_file`` + ``timm.create_model`` +
   ``load_state_dict(strict=False)``), on the full-size InternViT-300M (600 MB in bf16) and a scaled-up ViT of
   several GB; first run (empty model-key cache) and repeated run.
3. Conversion: ``-o`` (and ``--max-shard-size``) on the several-GB checkpoint against a plain copy of its bytes.
4. Start-up: ``keydiff --help`` and a safetensors-vs-safetensors diff against ``python -c pass``, and whether
   torch or timm were imported.

Every measurement is a subprocess of its own, so imports count; peak memory is the child's ``ru_maxrss``. Inputs are
generated in a temporary directory (random bf16 tensors with the real shapes, keys under a foreign naming) and
removed at the end. Defaults finish in about ten minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _moe import moe_pair, write_header_only  # a sibling file, found through the path above

PY = sys.executable
_BARE = """import json, struct, sys
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
"""
_USUAL = """import sys, timm
from safetensors.torch import load_file
sd = load_file(sys.argv[2])
model = timm.create_model(sys.argv[1], pretrained=False, num_classes=0)
result = model.load_state_dict(sd, strict=False)
print(len(result.missing_keys), len(result.unexpected_keys))
"""
_IMPORTS = "import torch, timm"
_LAUNCH = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump([seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status)], f)
"""
_COPY = """import os, shutil, sys
shutil.copyfile(sys.argv[1], sys.argv[2])
fd = os.open(sys.argv[2], os.O_RDONLY)
os.fsync(fd)  # the same durability as keydiff's writer, which syncs before renaming into place
os.close(fd)
"""


@dataclass(frozen=True)
class Run:
    """One subprocess: wall time, peak resident memory, exit code and output."""

    seconds: float
    peak_mb: float
    code: int
    stdout: str
    stderr: str


def run(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` and measure it alone.

    A small launcher forks and execs it and reports ``os.wait4``'s rusage: a child's peak RSS starts from its
    parent's, so measuring from this process (which may hold a large parsed mapping) would overstate it.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as result:
        proc = subprocess.run([PY, "-c", _LAUNCH, result.name, *cmd], stdout=out, stderr=err,
                              env={**os.environ, **(env or {})})
        if proc.returncode:
            raise SystemExit(f"launcher failed for {cmd}: exit code {proc.returncode}")
        seconds, peak_kb, code = json.loads(Path(result.name).read_text())
        out.seek(0)
        err.seek(0)
        return Run(seconds, peak_kb / 1024, code, out.read().decode(), err.read().decode())


def best(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> Run:
    """The median-time run of ``repeat`` (the machine is shared; the median resists one slow run)."""
    runs = sorted((run(cmd, env) for _ in range(repeat)), key=lambda r: r.seconds)
    return runs[len(runs) // 2]


def keydiff(*args: str) -> list[str]:
    """The CLI as a user runs it."""
    return [PY, "-m", "keydiff", *args]


def check(r: Run, what: str, codes: tuple[int, ...] = (0,)) -> Run:
    """Stop the benchmark on a failed step, showing why."""
    if r.code not in codes:
        raise SystemExit(f"{what} failed with exit code {r.code}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


# ------------------------------------------------------------------------------------------------------ inputs


def foreign(key: str) -> str:
    """A timm ViT key under another naming (an original-repo style): what keydiff has to work out."""
    key = key.replace("blocks.", "encoder.layer.").replace(".attn.", ".attention.")
    key = key.replace(".ls1.gamma", ".ls1").replace(".ls2.gamma", ".ls2")
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
    return fixed.get(key, key.replace("patch_embed.proj", "embeddings.patch_embedding"))


def write_vit_checkpoint(model: str, path: Path) -> tuple[int, int]:
    """Random bf16 tensors with ``model``'s real shapes, keys renamed; returns (bytes, largest tensor bytes)."""
    import timm
    import torch

    with torch.device("meta"):
        shapes = [(foreign(k), tuple(v.shape)) for k, v in
                  timm.create_model(model, pretrained=False, num_classes=0).state_dict().items()]
    shapes.sort()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes:
        n = 2 * _numel(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # a pool of random bf16 values, sliced per tensor: real-looking bytes without generating gigabytes of randoms
    pool = torch.randn(32 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).view(torch.uint8)
    pool_bytes = memoryview(pool.numpy())
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n, (_, shape) in enumerate(shapes):
            size = 2 * _numel(shape)
            start = (n * 7919 * 64) % (len(pool_bytes) - size) if size < len(pool_bytes) else 0
            while size:
                chunk = pool_bytes[start: start + min(size, len(pool_bytes) - start)]
                f.write(chunk)
                size -= len(chunk)
                start = 0
    return offset, max(2 * _numel(s) for _, s in shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------------ figures


KEY_LAYOUTS = {"keys": "wide", "deep": "deep", "unclean": "unclean"}
"""``--only`` names of the key-scale layouts."""


def figure_keys(work: Path, layers: int, experts: int, repeat: int, *, layout: str = "wide") -> list[str]:
    """1. Key scale: keydiff on a ~100k-key MoE pair against reading both headers.

    ``layout="unclean"`` leaves one expert tensor out of the checkpoint (the middle layer's middle expert's ``w1``):
    the right answer maps every other key and reports that one model key as unresolved (exit code 1).
    """
    pairs = list(moe_pair(layers, experts))
    dropped = None
    if layout == "unclean":
        dropped = f"model.layers.{layers // 2}.block_sparse_moe.experts.{experts // 2}.w1.weight"
    original, hf = work / f"original-{layout}.safetensors", work / f"hf-{layout}.safetensors"
    write_header_only(original, [(o, s) for o, _, s in pairs])
    write_header_only(hf, [(h, s) for _, h, s in pairs if h != dropped])
    bare_script = work / "bare.py"
    bare_script.write_text(_BARE)
    mapped = work / f"map-{layout}.json"
    codes = (1,) if dropped else (0,)
    # the two commands take turns, so that a slow spell of this shared machine falls on both; the ratio is the
    # median of the per-turn ratios
    turns = []
    for _ in range(repeat):
        b = run([PY, str(bare_script), str(original), str(hf)])
        k = check(run(keydiff(str(original), str(hf), "--json", str(mapped), "-q")),
                  f"keydiff on the {layout} MoE pair", codes)
        turns.append((k.seconds / b.seconds, k, b))
    turns.sort(key=lambda t: t[0])
    ratio, kd, bare = turns[len(turns) // 2]
    truth = {o: h for o, h, _ in pairs if h != dropped}
    doc = json.loads(mapped.read_text())
    mapped.unlink()
    right = sum(e["target"] in truth and e["source"] == [truth[e["target"]]] and e["op"]["kind"] == "rename"
                for e in doc["entries"])
    wrong = len(doc["entries"]) - right
    expected_missing = [o for o, h, _ in pairs if h == dropped]
    exact = [m["key"] for m in doc["missing"]] == expected_missing and not doc["unused"] and not wrong
    goal = 5 if dropped else 3
    what = {"wide": "", "deep": ", deep", "unclean": f", unclean: {dropped} left out of the checkpoint"}[layout]
    return [
        f"1. key scale ({layout}): {len(pairs):,} keys per side ({layers} layers x {experts} experts, Mixtral vs "
        f"Mistral names{what})",
        f"   keydiff / bare header read = {ratio:.1f}x (goal <= {goal}x: {'met' if ratio <= goal else 'NOT met'}); "
        f"per turn {', '.join(f'{t[0]:.2f}' for t in sorted(turns, key=lambda t: t[0]))}",
        f"   mapping correct: {right:,} of {len(truth):,} mappable keys ({100 * right / len(truth):.2f}%), "
        f"{wrong} wrong, {len(doc['missing'])} unresolved, {len(doc['unused'])} unused "
        f"({'exactly as expected' if exact else 'NOT as expected'})",
        f"     keydiff --json: {kd.seconds:.2f} s, {kd.peak_mb:.0f} MB   bare header read: {bare.seconds:.2f} s, "
        f"{bare.peak_mb:.0f} MB",
    ]


def figure_big(work: Path, models: list[str], repeat: int) -> tuple[list[str], dict[str, Path]]:
    """2. Big tensors: keydiff first and repeated run against the usual route."""
    lines = ["2. big tensors: keydiff MODEL CKPT vs load_file + timm.create_model + load_state_dict(strict=False)"]
    usual_script = work / "usual.py"
    usual_script.write_text(_USUAL)
    imports = best([PY, "-c", _IMPORTS], repeat)
    made: dict[str, Path] = {}
    for model in models:
        ckpt = work / f"{model}.safetensors"
        size, _ = write_vit_checkpoint(model, ckpt)
        made[model] = ckpt
        # the usual route holds the checkpoint and an fp32 model: repeat it only while that stays small
        usual = check(best([PY, str(usual_script), model, str(ckpt)], repeat if size < 2e9 else 1),
                      f"usual route on {model}")
        firsts = []
        for n in range(repeat):
            # a first run has an empty model-key cache: a fresh directory each time
            env = {"KEYDIFF_CACHE_DIR": str(work / f"cache-{model}-{n}")}
            firsts.append(check(run(keydiff(model, str(ckpt), "-m", "num_classes=0", "-q"), env),
                                f"keydiff on {model}"))
        first = sorted(firsts, key=lambda r: r.seconds)[len(firsts) // 2]
        env = {"KEYDIFF_CACHE_DIR": str(work / f"cache-{model}-0")}
        again = check(best(keydiff(model, str(ckpt), "-m", "num_classes=0", "-q"), repeat, env),
                      f"keydiff again on {model}")
        speed_first, speed_again = usual.seconds / first.seconds, usual.seconds / again.seconds
        lines += [
            f"   {model} ({size / 1e9:.2f} GB bf16): first run {speed_first:.1f}x faster "
            f"(goal >= 2x: {'met' if speed_first >= 2 else 'NOT met'}), repeated run {speed_again:.1f}x faster "
            f"(goal >= 10x: {'met' if speed_again >= 10 else 'NOT met'}); peak memory "
            f"{first.peak_mb:.0f} / {again.peak_mb:.0f} MB vs {usual.peak_mb:.0f} MB",
            f"     usual route {usual.seconds:.2f} s, {usual.peak_mb:.0f} MB | keydiff first {first.seconds:.2f} s, "
            f"{first.peak_mb:.0f} MB | repeated {again.seconds:.2f} s, {again.peak_mb:.0f} MB",
        ]
    lines.append(f"     (import torch, timm alone: {imports.seconds:.2f} s, {imports.peak_mb:.0f} MB)")
    return lines, made


def figure_convert(work: Path, model: str, ckpt: Path, shard: str) -> list[str]:
    """3. Conversion: -o and --max-shard-size against a plain copy of the same bytes."""
    copy_script = work / "copy.py"
    copy_script.write_text(_COPY)
    env = {"KEYDIFF_CACHE_DIR": str(work / f"cache-{model}-0")}
    copy = check(run([PY, str(copy_script), str(ckpt), str(work / "copy.safetensors")]), "plain copy")
    (work / "copy.safetensors").unlink()
    cached = check(run([PY, "-c", "import shutil, sys; shutil.copyfile(*sys.argv[1:])", str(ckpt),
                        str(work / "copy.safetensors")]), "plain copy without fsync")
    (work / "copy.safetensors").unlink()
    out = work / "converted.safetensors"
    conv = check(run(keydiff(model, str(ckpt), "-m", "num_classes=0", "-q", "-o", str(out)), env), "conversion")
    out.unlink()
    shard_dir = work / "sharded"
    shard_dir.mkdir()
    index = shard_dir / "model.safetensors.index.json"
    sharded = check(run(keydiff(model, str(ckpt), "-m", "num_classes=0", "-q", "-o", str(index),
                                "--max-shard-size", shard), env), "sharded conversion")
    layout = json.loads(index.read_text())
    shards = sorted(p.name for p in shard_dir.glob("*.safetensors"))
    complete = set(layout["weight_map"].values()) == set(shards)
    shutil.rmtree(shard_dir)
    largest = max(_largest_tensor(ckpt), 1)
    # what importing torch and safetensors alone holds: the part of the peak that no checkpoint size changes
    floor = run([PY, "-c", "import torch, safetensors.torch"])
    ratio = conv.seconds / copy.seconds
    above = max(conv.peak_mb - floor.peak_mb, 0.0)
    return [
        f"3. conversion of {model} ({ckpt.stat().st_size / 1e9:.2f} GB): -o / plain copy = {ratio:.1f}x "
        f"(goal <= 2x: {'met' if ratio <= 2 else 'NOT met'}); peak memory {conv.peak_mb:.0f} MB = import torch "
        f"{floor.peak_mb:.0f} MB + {above:.0f} MB ({above * 2**20 / largest:.1f}x the largest tensor of "
        f"{largest / 2**20:.0f} MB; the checkpoint is {ckpt.stat().st_size / 2**20:.0f} MB)",
        f"     -o: {conv.seconds:.2f} s, {conv.peak_mb:.0f} MB | plain copy + fsync: {copy.seconds:.2f} s, "
        f"{copy.peak_mb:.0f} MB | --max-shard-size {shard}: {sharded.seconds:.2f} s, {sharded.peak_mb:.0f} MB, "
        f"{len(shards)} shards + index ({'weight_map complete' if complete else 'INDEX MISMATCH'})",
        f"     copy without fsync (data left in the page cache): {cached.seconds:.2f} s; -o / that = "
        f"{conv.seconds / cached.seconds:.1f}x (keydiff syncs before renaming into place, so the fair baseline "
        "syncs too)",
    ]


def _largest_tensor(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return max(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())


def figure_startup(work: Path, repeat: int) -> list[str]:
    """4. Start-up: --help and a header-only diff against python -c pass, and what they imported."""
    pairs = list(moe_pair(2, 8))
    a, b = work / "small_a.safetensors", work / "small_b.safetensors"
    write_header_only(a, [(o, s) for o, _, s in pairs])
    write_header_only(b, [(h, s) for _, h, s in pairs])
    bare = best([PY, "-c", "pass"], repeat)
    lines = ["4. start-up (no torch, no timm: lazy imports)"]
    for label, args in (("keydiff --help", ["--help"]), ("keydiff a.safetensors b.safetensors", [str(a), str(b)])):
        r = check(best(keydiff(*args), repeat), label)
        traced = run([PY, "-X", "importtime", "-m", "keydiff", *args])
        heavy = sorted({line.split("|")[-1].strip().split(".")[0] for line in traced.stderr.splitlines()
                        if line.startswith("import time:")} & {"torch", "timm"})
        lines.append(f"   {label}: {r.seconds:.2f} s = {r.seconds / bare.seconds:.1f}x python -c pass "
                     f"({bare.seconds:.2f} s); imports torch/timm: {', '.join(heavy) if heavy else 'no'}")
    return lines


def byte_compile() -> str:
    """Byte-compile keydiff's modules, as ``pip install`` leaves an installed package.

    Python caches compiled modules on first import unless ``PYTHONDONTWRITEBYTECODE`` is set (this machine sets
    it); without the cache every measured run would compile keydiff from source first.
    """
    import compileall

    spec = importlib.util.find_spec("keydiff")
    if spec is None or spec.origin is None:
        return "keydiff not importable"
    compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)
    return "keydiff modules byte-compiled, as pip install leaves them"


def machine() -> list[str]:
    """CPU, cores, RAM and versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        ram = f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        ram = "RAM unknown"
    versions = ", ".join(f"{d} {_version(d)}" for d in ("torch", "timm", "safetensors"))
    return [f"machine: {cpu}, {os.cpu_count()} cores, {ram}; Python {platform.python_version()}, {versions}"]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64, help="MoE layers (key scale; deep: twice as many)")
    ap.add_argument("--experts", type=int, default=512, help="experts per layer (key scale; deep: half as many)")
    ap.add_argument("--vit", default="vit_intern300m_patch14_448", help="full-size model of figure 2")
    ap.add_argument("--big-vit", default="vit_gigantic_patch14_224", help="several-GB model of figures 2 and 3")
    ap.add_argument("--shard", default="1GB", help="--max-shard-size of figure 3")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cheap measurement (the median is kept)")
    ap.add_argument("--only", default="keys,deep,unclean,big,convert,startup", help="figures to run, comma-separated")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate inputs (default: a temp dir)")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    lines = machine()
    lines[0] += f"; {byte_compile()}"
    print(lines[0], flush=True)
    work = Path(tempfile.mkdtemp(prefix="keydiff-bench-", dir=args.workdir))
    try:
        figures: list[list[str]] = []
        for name, layout in KEY_LAYOUTS.items():
            if name in only:
                layers, experts = (2 * args.layers, args.experts // 2) if layout == "deep" else (args.layers,
                                                                                                  args.experts)
                figures.append(figure_keys(work, layers, experts, args.repeat, layout=layout))
                print("\n".join(figures[-1]), flush=True)
        made: dict[str, Path] = {}
        if only & {"big", "convert"}:
            models = [args.vit, args.big_vit] if "big" in only else [args.big_vit]
            if "big" in only:
                lines_big, made = figure_big(work, models, args.repeat)
                figures.append(lines_big)
                print("\n".join(lines_big), flush=True)
            else:
                made = {args.big_vit: work / f"{args.big_vit}.safetensors"}
                write_vit_checkpoint(args.big_vit, made[args.big_vit])
                # the key cache the conversion uses is warmed by one diagnosis, as figure 2 would have done
                run(keydiff(args.big_vit, str(made[args.big_vit]), "-m", "num_classes=0", "-q"),
                    {"KEYDIFF_CACHE_DIR": str(work / f"cache-{args.big_vit}-0")})
        if "convert" in only:
            figures.append(figure_convert(work, args.big_vit, made[args.big_vit], args.shard))
            print("\n".join(figures[-1]), flush=True)
        for model, path in made.items():
            if model != args.big_vit:
                path.unlink()
        if "startup" in only:
            figures.append(figure_startup(work, args.repeat))
            print("\n".join(figures[-1]), flush=True)
        print("\nsummary: the ratios (details above)")
        for fig in figures:
            print("\n".join(line for line in fig if not line.startswith("     ")))
        print(lines[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
