"""Run keydiff's CLI on every case of the shared real-pairs harness and print a verdict table.

    python benchmarks/realpairs_cli.py [--harness ../shared/bench/realpairs.py] [CASE ...]

For each case: build it, run `keydiff TARGET SOURCE -m ... --json map.json -o out.safetensors`, then the harness's
own `check`. A positive case passes when keydiff exits 0 and check passes; a negative one when keydiff exits 1 and
writes nothing that loads. Prints wall time of the keydiff call (including Python start-up and imports).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", type=Path, default=ROOT.parent / "shared" / "bench" / "realpairs.py")
    ap.add_argument("cases", nargs="*")
    args = ap.parse_args()
    harness = [sys.executable, str(args.harness)]
    listing = run([*harness, "list"]).stdout.split("\n")
    cases = args.cases or [line.split()[0] for line in listing if line.strip()]
    passed = 0
    print(f"{'case':26} {'exit':>4} {'keydiff s':>9}  verdict")
    for case in cases:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            built = run([*harness, "build", case, d])
            if built.returncode:
                print(f"{case:26} build failed: {built.stderr.strip()[-200:]}")
                continue
            info = json.loads((out / "case.json").read_text())
            model_args = [a for k, v in info["target_kwargs"].items() for a in ("-m", f"{k}={v!r}")]
            t0 = time.perf_counter()
            kd = run([sys.executable, "-m", "keydiff", info["target"], str(out / info["source_file"]), *model_args,
                      "--json", str(out / "map.json"), "-o", str(out / "out.safetensors"), "-q"])
            seconds = time.perf_counter() - t0
            check = run([*harness, "check", case, str(out / "out.safetensors")])
            verdict = json.loads(check.stdout.strip().splitlines()[-1]) if check.stdout.strip() else {}
            ok = verdict.get("passed", False) and kd.returncode == (1 if info["negative"] else 0)
            passed += ok
            detail = verdict.get("detail", "") or f"max rel diff {verdict.get('max_abs_diff')}"
            err = kd.stderr.strip().splitlines()[-1] if kd.returncode == 2 or kd.returncode > 3 else ""
            print(f"{case:26} {kd.returncode:>4} {seconds:9.1f}  {'PASS' if ok else 'FAIL'} {detail} {err}",
                  flush=True)
    print(f"{passed} passed, {len(cases) - passed} failed")
    return 0 if passed == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
