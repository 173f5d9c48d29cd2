"""Scale and start-up: a mixture-of-experts pair maps completely, the CLI's light paths import neither torch nor
timm, and the fast paths behind them (header parsing, the assignment) agree with the slow references."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest

from keydiff._match import SMALL_ASSIGNMENT, _assign
from keydiff._sources import _parse_header_fast, read_safetensors_header
from keydiff.cli import main

DIM, KV, FFN = 8, 4, 16


def moe_pair(layers: int, experts: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(original Mistral key, Hugging Face Mixtral key, shape) of a tiny MoE decoder."""
    out = [("tok_embeddings.weight", "model.embed_tokens.weight", (32, DIM))]
    for n in range(layers):
        o, h = f"layers.{n}.", f"model.layers.{n}."
        out += [(f"{o}attention.w{a}.weight", f"{h}self_attn.{a}_proj.weight", (KV if a in "kv" else DIM, DIM))
                for a in "qkvo"]
        out.append((f"{o}feed_forward.gate.weight", f"{h}block_sparse_moe.gate.weight", (experts, DIM)))
        out += [(f"{o}feed_forward.experts.{e}.{w}.weight", f"{h}block_sparse_moe.experts.{e}.{w}.weight",
                 (DIM, FFN) if w == "w2" else (FFN, DIM)) for e in range(experts) for w in ("w1", "w2", "w3")]
        out += [(f"{o}attention_norm.weight", f"{h}input_layernorm.weight", (DIM,)),
                (f"{o}ffn_norm.weight", f"{h}post_attention_layernorm.weight", (DIM,))]
    return [*out, ("norm.weight", "model.norm.weight", (DIM,)), ("output.weight", "lm_head.weight", (32, DIM))]


def write_header(path, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """A valid bf16 safetensors file of zeros, keys sorted as safetensors writes them."""
    header, offset = {}, 0
    for key, shape in sorted(tensors):
        n = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_moe_pair_of_5000_keys_maps_every_key_correctly(tmp_path):
    pairs = moe_pair(layers=8, experts=200)
    assert len(pairs) > 4800
    write_header(tmp_path / "original.safetensors", [(o, s) for o, _, s in pairs])
    write_header(tmp_path / "hf.safetensors", [(h, s) for _, h, s in pairs])
    code = main([str(tmp_path / "original.safetensors"), str(tmp_path / "hf.safetensors"),
                 "--json", str(tmp_path / "map.json"), "-q"])
    assert code == 0
    doc = json.loads((tmp_path / "map.json").read_text())
    truth = {o: h for o, h, _ in pairs}
    got = {e["target"]: (e["source"], e["op"]["kind"]) for e in doc["entries"]}
    assert got == {o: ([h], "rename") for o, h in truth.items()}


_WATCH = """import os, runpy, sys
exit_now = os._exit

def report_and_exit(code):  # the CLI leaves through os._exit once its outputs are written
    print("HEAVY", sorted(m for m in ("torch", "timm") if m in sys.modules), file=sys.stderr, flush=True)
    exit_now(code)

os._exit = report_and_exit
sys.argv = ["keydiff", *sys.argv[1:]]
runpy.run_module("keydiff", run_name="__main__")
"""


@pytest.mark.parametrize("kind", ["help", "header-only diff"])
def test_light_paths_import_neither_torch_nor_timm(kind, tmp_path):
    args = ["--help"]
    if kind != "help":
        pairs = moe_pair(layers=2, experts=4)
        write_header(tmp_path / "a.safetensors", [(o, s) for o, _, s in pairs])
        write_header(tmp_path / "b.safetensors", [(h, s) for _, h, s in pairs])
        args = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    done = subprocess.run([sys.executable, "-c", _WATCH, *args], capture_output=True, text=True,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr


def test_fast_header_parse_agrees_with_the_full_parser(tmp_path):
    pairs = moe_pair(layers=2, experts=3)
    path = tmp_path / "x.safetensors"
    write_header(path, [(h, s) for _, h, s in pairs])
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    fast = _parse_header_fast(raw[8: 8 + n], len(raw) - 8 - n)
    assert fast is not None
    assert fast[0] == read_safetensors_header(path).tensors


@pytest.mark.parametrize("header", [
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"F32"}}',
    b'{"a:b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}',
    b'{"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}',
])
def test_fast_header_parse_defers_anything_unusual_to_the_full_parser(header):
    assert _parse_header_fast(header, 4) is None


def test_pure_python_assignment_matches_scipy_pair_for_pair():
    np = pytest.importorskip("numpy")
    from scipy.optimize import linear_sum_assignment

    rng = random.Random(0)
    for trial in range(2000):
        n, m = rng.randint(1, 8), rng.randint(1, 8)
        # ties everywhere, as in real score matrices (0.0 for incompatible pairs, repeated name scores)
        values = [0.0, 0.0, 1.3, 1.3, 1.45, 1.9] if trial % 2 else [rng.random() + 1 for _ in range(4)] + [0.0]
        profit = [[rng.choice(values) for _ in range(m)] for _ in range(n)]
        rows, cols = linear_sum_assignment(np.array(profit), maximize=True)
        assert _assign(profit) == ([int(i) for i in rows], [int(j) for j in cols]), profit
    assert SMALL_ASSIGNMENT >= 64 * 64


def test_unique_pairs_counted_per_profile_match_the_pairwise_reference():
    from collections import defaultdict

    from keydiff._match import _unique_pairs, unit_relation
    from keydiff._patterns import Leaf, Unit

    def reference(src, dst):
        fits = {i: [j for j, t in enumerate(dst) if unit_relation(s, t) is not None] for i, s in enumerate(src)}
        back = defaultdict(list)
        for i, js in fits.items():
            for j in js:
                back[j].append(i)
        return [(i, js[0]) for i, js in fits.items() if len(js) == 1 and len(back[js[0]]) == 1]

    rng = random.Random(0)
    shapes = [(4,), (8,), (4, 8), (8, 4), (2, 16), (32,), (1, 32)]

    def unit(n):
        names = sorted(rng.sample(["weight", "bias", "running_mean"], rng.randint(1, 2)))
        leaves = tuple(Leaf(name, (f"u{n}.{name}",), rng.choice(shapes), rng.choice(["float32", "int64"]))
                       for name in names)
        return Unit(path=f"u{n}", leaves=leaves, template="u", indices=(), position=n)

    for _ in range(500):
        src = [unit(i) for i in range(rng.randint(0, 7))]
        dst = [unit(i) for i in range(rng.randint(0, 7))]
        assert _unique_pairs(src, dst) == reference(src, dst)


def test_thousands_of_leftovers_are_explained_without_pairwise_scans(tmp_path):
    pairs = moe_pair(layers=8, experts=200)
    renamed = [(h.replace("experts", "zz").replace(".w", ".v"), s) for _, h, s in pairs]
    write_header(tmp_path / "original.safetensors", [(o, s) for o, _, s in pairs])
    write_header(tmp_path / "renamed.safetensors", renamed)
    code = main([str(tmp_path / "original.safetensors"), str(tmp_path / "renamed.safetensors"),
                 "--json", str(tmp_path / "map.json"), "-q"])
    assert code == 1
    doc = json.loads((tmp_path / "map.json").read_text())
    assert len(doc["missing"]) >= 4800 and all(m["reason"] for m in doc["missing"])
    assert all(len(m["candidates"]) <= 3 for m in doc["missing"])


def test_moe_pair_above_the_fold_threshold_maps_every_key_through_folds(tmp_path, monkeypatch):
    from keydiff import _diff
    from keydiff._fold import FOLD_MIN_KEYS

    pairs = moe_pair(layers=4, experts=900)
    assert 2 * len(pairs) >= FOLD_MIN_KEYS
    write_header(tmp_path / "original.safetensors", [(o, s) for o, _, s in pairs])
    write_header(tmp_path / "hf.safetensors", [(h, s) for _, h, s in pairs])
    expanded = []
    monkeypatch.setattr(_diff, "expand_entries", lambda *a, _f=_diff.expand_entries: expanded.append(_f(*a)) or
                        expanded[-1])
    code = main([str(tmp_path / "original.safetensors"), str(tmp_path / "hf.safetensors"),
                 "--json", str(tmp_path / "map.json"), "-q"])
    assert code == 0
    assert expanded and expanded[0] is not None  # the folded answer was clean and used
    doc = json.loads((tmp_path / "map.json").read_text())
    truth = {o: h for o, h, _ in pairs}
    assert {e["target"]: (e["source"], e["op"]["kind"]) for e in doc["entries"]} == {
        o: ([h], "rename") for o, h in truth.items()}
    assert doc["complete"] and not doc["missing"] and not doc["unused"]
    # the report's cluster labels name the folds' whole index sets, not the representative child
    labels = {e["evidence"]["cluster"] for e in doc["entries"] if "experts" in e["target"]}
    assert all("experts.{0..899}" in label for label in labels)
