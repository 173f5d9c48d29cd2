"""Solve rate and precision of keydiff over the test corpus of real pairs (tests/pairs.py).

    python benchmarks/corpus.py

For each pair: the source model gets random weights in every tensor and is saved the way the pair says (safetensors,
whose keys are sorted, or a torch file in registration order); keydiff proposes a mapping from the file; the
converted checkpoint is loaded strictly into the timm target and both models run on one random input.

A pair is solved when every model key is filled and the outputs agree (relative difference < 1e-3). An applied
entry counts as correct when its pair's outputs agree: with every tensor random, a wrong entry (a swapped norm, a
wrong q/k/v order, a transposed square weight) changes the output. Entries of a pair whose outputs disagree all
count as unverified. Negative controls must end unresolved (exit 1) with no entry filling a slot of another index.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    import keydiff

    from pairs import CORPUS_PAIRS, max_rel_diff, write_source
    from test_corpus import NEGATIVE

    solved = entries = verified = loadable_wrong = 0
    print(f"{'pair':24} {'keys':>5} {'mapped':>6} {'method mix':28} {'rel diff':>9} {'s':>5}  verdict")
    for pair in CORPUS_PAIRS:
        with tempfile.TemporaryDirectory() as d:
            path, src = write_source(pair, Path(d))
            t0 = time.perf_counter()
            diff = keydiff.diff(pair.target, str(path), **pair.target_kwargs)
            seconds = time.perf_counter() - t0
            applied = diff.mapping.entries
            methods: dict[str, int] = {}
            for e in applied:
                methods[e.evidence.method] = methods.get(e.evidence.method, 0) + 1
            mix = " ".join(f"{k}:{v}" for k, v in sorted(methods.items()))
            rel = None
            if diff.ok:
                dst = pair.target_model()
                dst.load_state_dict(diff.apply(), strict=True)
                rel = max_rel_diff(pair, src, dst)
            ok = rel is not None and rel < 1e-3
            solved += ok
            entries += len(applied)
            verified += len(applied) if ok else 0
            loadable_wrong += diff.ok and not ok
            print(f"{pair.name:24} {len(diff.model):5} {len(applied):6} {mix:28} "
                  f"{'-' if rel is None else f'{rel:.1e}':>9} {seconds:5.2f}  {'solved' if ok else 'NOT SOLVED'}",
                  flush=True)
    refused = 0
    for why, pair in NEGATIVE:
        with tempfile.TemporaryDirectory() as d:
            path, _ = write_source(pair, Path(d))
            diff = keydiff.diff(pair.target, str(path), **pair.target_kwargs)
            refused += not diff.ok
            print(f"{pair.name:24} negative ({why}): {'refused' if not diff.ok else 'NOT REFUSED'}; "
                  f"{len(diff.mapping.missing)} keys unresolved")
    print(f"\npairs solved: {solved}/{len(CORPUS_PAIRS)}; negative controls refused: {refused}/{len(NEGATIVE)}")
    print(f"mapping precision (entries in pairs whose outputs agree / entries applied): {verified}/{entries} "
          f"= {verified / max(entries, 1):.1%}; complete mappings that load but compute something else: "
          f"{loadable_wrong}")
    return 0 if solved == len(CORPUS_PAIRS) and refused == len(NEGATIVE) else 1


if __name__ == "__main__":
    sys.exit(main())
