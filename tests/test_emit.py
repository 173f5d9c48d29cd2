"""Generated ``checkpoint_filter_fn``: self-contained, ruff-clean, and it loads real pairs strictly with the same
outputs; on every op kind it agrees with ``KeyMap.apply``."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file

import keydiff
from keydiff._mapping import Entry, Evidence, KeyMap, Leftover, Unwrap, compress_rules
from keydiff._ops import Op
from keydiff._render._python import FUNCTION, emit_python
from keydiff.cli import main

from pairs import CORE_PAIRS, VIT, Pair, max_rel_diff, write_source

PAIRS = {p.name: p for p in CORE_PAIRS}
RUFF = shutil.which("ruff")


def _imports(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def _filter(code: str) -> Callable[..., dict]:
    assert _imports(code) <= {"__future__", "re", "torch"}
    namespace: dict = {}
    exec(compile(code, "filter.py", "exec"), namespace)
    return namespace[FUNCTION]


def _ruff(code: str) -> None:
    if RUFF is None:
        pytest.skip("ruff is not installed")
    proc = subprocess.run([RUFF, "check", "--isolated", "--no-cache", "--select", "E,F,W,I,B,UP,RUF,SIM",
                           "--line-length", "120", "--target-version", "py39", "--stdin-filename", "filter.py", "-"],
                          input=code, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + code


def _source_state(pair: Pair, path) -> dict:
    return load_file(str(path)) if pair.fmt == "safetensors" else torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", ["hf_vit", "tv_convnext", "openclip_vit", "ddp_prefix", "lightning_compile"])
def test_generated_filter_loads_a_real_pair_strictly(name, tmp_path):
    pair = PAIRS[name]
    path, src = write_source(pair, tmp_path)
    d = keydiff.diff(pair.target, path, **pair.target_kwargs)
    code = d.to_python()
    _ruff(code)
    # the whole training checkpoint goes in: the function finds the tensors and drops the wrapper prefix itself
    out = _filter(code)(_source_state(pair, path))
    dst = pair.target_model()
    dst.load_state_dict(out, strict=True)
    assert max_rel_diff(pair, src, dst) < 1e-4
    assert set(out) == set(dst.state_dict())


def test_cli_writes_code_that_runs_without_keydiff(tmp_path, capsys):
    pair = PAIRS["hf_vit"]
    path, src = write_source(pair, tmp_path)
    filter_py = tmp_path / "filter.py"
    assert main([pair.target, str(path), *pair.model_args(), "--emit-python", str(filter_py), "-q"]) == 0
    code = filter_py.read_text()
    assert "\nRULES = [" in code and "\nFUSED = {" in code and "keydiff" not in _imports(code)
    # a fresh interpreter where keydiff cannot be imported
    probe = (
        "import sys; sys.modules['keydiff'] = None\n"
        "import torch, runpy\n"
        f"fn = runpy.run_path({str(filter_py)!r})['{FUNCTION}']\n"
        f"from safetensors.torch import load_file\n"
        f"sd = fn(load_file({str(path)!r}))\n"
        "torch.save(sd, sys.argv[1])\n"
    )
    saved = tmp_path / "converted.pt"
    proc = subprocess.run([sys.executable, "-c", probe, str(saved)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dst = pair.target_model()
    dst.load_state_dict(torch.load(saved, weights_only=True), strict=True)
    assert max_rel_diff(pair, src, dst) < 1e-4


def test_split_ops_convert_timm_back_to_transformers():
    import timm
    from transformers import ViTConfig, ViTModel

    from pairs import randomise

    src = randomise(timm.create_model("vit_base_patch16_224", pretrained=False, **VIT))
    dst = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
    d = keydiff.diff(dst, src.state_dict())
    assert d.ok and sum(e.op.kind == "split" for e in d.mapping.entries) == 12
    code = d.to_python()
    assert "\nSPLIT = {" in code
    _ruff(code)
    dst.load_state_dict(_filter(code)(src.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(pixel_values=x).last_hidden_state, src.forward_features(x))


def _entry(source: tuple[str, ...], target: str, op: Op, shapes: tuple, target_shape: tuple) -> Entry:
    return Entry(source=source, target=target, op=op, confidence=1.0, evidence=Evidence(method="cluster"),
                 source_shapes=shapes, target_shape=target_shape)


LONG = "encoder." + ".".join(f"very_long_module_name_{i}" for i in range(6))


def _every_op_mapping() -> tuple[KeyMap, dict]:
    """A training checkpoint under ``state_dict`` with a ``module.`` prefix, and a mapping using every op kind."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "module.enc.layers.0.fc.weight": (3, 2), "module.enc.layers.1.fc.weight": (3, 2), "module.norm.weight": (2,),
        "module.cls": (4,), "module.proj": (3, 4), "module.q": (4, 2), "module.k": (4, 2), "module.v": (4, 2),
        "module.in_proj": (6, 2), "module.extra": (7,), f"module.{LONG}.weight": (2,), "module.flat_qk": (8,),
    }
    sd = {k: torch.randn(s, generator=g) for k, s in tensors.items()}
    entries = [
        _entry(("module.enc.layers.0.fc.weight",), "blocks.0.fc.weight", Op(kind="rename"), ((3, 2),), (3, 2)),
        _entry(("module.enc.layers.1.fc.weight",), "blocks.1.fc.weight", Op(kind="rename"), ((3, 2),), (3, 2)),
        _entry(("module.norm.weight",), "norm.weight", Op(kind="rename"), ((2,),), (2,)),
        _entry(("module.cls",), "cls_token", Op(kind="reshape"), ((4,),), (1, 1, 4)),
        _entry(("module.proj",), "head.weight", Op(kind="transpose"), ((3, 4),), (4, 3)),
        _entry(("module.q", "module.k", "module.v"), "attn.qkv.weight", Op(kind="concat", sizes=(4, 4, 4)),
               ((4, 2),) * 3, (12, 2)),
        *(_entry(("module.in_proj",), f"split.{n}.weight", Op(kind="split", index=i, sizes=(2, 2, 2)), ((6, 2),),
                 (2, 2)) for i, n in enumerate("abc")),
        _entry((f"module.{LONG}.weight",), f"{LONG}.renamed.weight", Op(kind="rename"), ((2,),), (2,)),
        # an op whose natural result is then reshaped: split a flat tensor into two [2, 2] parts
        *(_entry(("module.flat_qk",), f"qk.{i}", Op(kind="split", index=i, sizes=(4, 4)), ((8,),), (2, 2))
          for i in range(2)),
    ]
    km = KeyMap(entries=tuple(entries), rules=compress_rules(entries), unused=(Leftover(
        key="module.extra", shape=(7,), reason="no counterpart"),), unwrap=Unwrap(container="state_dict",
                                                                                   strip_prefix="module."),
                model="demo", checkpoint="/data/ckpt.pth")
    return km, {"state_dict": sd | {"step": 7}, "epoch": 3}


def test_every_op_kind_agrees_with_keymap_apply():
    km, checkpoint = _every_op_mapping()
    code = emit_python(km, version="9.9")
    _ruff(code)
    for table in ("RULES", "RESHAPED", "TRANSPOSED", "FUSED", "SPLIT", "SHAPES", "DROPPED", "CONTAINER",
                  "STRIP_PREFIX"):
        assert f"\n{table} = " in code
    assert "Generated by keydiff 9.9" in code and "ckpt.pth" in code and "/data" not in code
    got = _filter(code)(checkpoint)
    want = km.apply(checkpoint)
    assert list(sorted(got)) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # the same function accepts the bare tensor dict, without the container
    assert set(_filter(code)(checkpoint["state_dict"])) == set(want)


def test_incomplete_mapping_says_so():
    km, _ = _every_op_mapping()
    incomplete = KeyMap(entries=km.entries[:3], missing=(Leftover(key="x", shape=(1,), reason="none"),),
                        unwrap=km.unwrap)
    code = emit_python(incomplete)
    assert "INCOMPLETE: 1 model keys have no source" in " ".join(code.split())
    _ruff(code)


def test_long_keys_need_no_noqa_and_pass_plain_ruff_isolated():
    """Issue 13.10: `ruff check --isolated` (its default rules) found 4 unused `# noqa: E501`."""
    if RUFF is None:
        pytest.skip("ruff is not installed")
    long = "very_long_module_name_segment_for_testing_width"
    model = {f"{long}.{long}.blocks.{i}.{long}.{n}.weight": torch.zeros(4, 4) for i in range(2) for n in ("a", "b")}
    ckpt = {f"enc.{long}.{long}.layer.{i}.{long}.{n}x.weight": torch.zeros(4, 4) for i in range(2) for n in ("a", "b")}
    code = keydiff.diff(model, ckpt).to_python()
    assert "noqa" not in code
    proc = subprocess.run([RUFF, "check", "--isolated", "--no-cache", "--stdin-filename", "filter.py", "-"],
                          input=code, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + code
    _ruff(code)
    assert sorted(_filter(code)(ckpt)) == sorted(model)
