"""Hostile and broken inputs through the CLI: never run foreign code, never lose data, always a clear answer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from keydiff import KeydiffError, KeyMap
from keydiff._sources import read_checkpoint
from keydiff.cli import main

from test_sources import BROKEN


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_checkpoint_is_exit_2_with_one_line(tmp_path, capsys, name):
    make, _, _ = BROKEN[name]
    path = tmp_path / name
    make(path)
    before = _digest(path)
    assert main(["resnet18", str(path), "-o", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keydiff: error: ") and len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err and str(path) in err
    assert _digest(path) == before
    assert not (tmp_path / "out.safetensors").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("form", ["zip", "plain"])
def test_malicious_pickle_runs_nothing_and_names_the_opt_in(tmp_path, capsys, form):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.zeros(2), "x": _Payload(marker)}
    if form == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert main(["resnet18", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--unsafe-pickle" in err and "nothing was executed" in err
    assert not marker.exists()


def test_unsafe_pickle_warns_loudly(tmp_path, capsys):
    path = tmp_path / "ok.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    main(["resnet18", str(path), "--unsafe-pickle", "-q"])
    assert "WARNING: --unsafe-pickle" in capsys.readouterr().err


def test_duplicate_keys_after_prefix_stripping_are_named(tmp_path, capsys):
    import timm

    sd = timm.create_model("resnet18", pretrained=False, layers=[1, 1, 1, 1]).state_dict()
    both = {**{"module." + k: v for k, v in sd.items()}, "conv1.weight": sd["conv1.weight"].clone()}
    path = tmp_path / "dup.safetensors"
    save_file({k: v.contiguous() for k, v in both.items()}, str(path))
    assert main(["resnet18", str(path), "-m", "layers=[1,1,1,1]"]) == 2
    err = capsys.readouterr().err
    assert "two tensors the same name 'conv1.weight'" in err and "'module.conv1.weight'" in err


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    (json.dumps({"schema": "keydiff/mapping", "version": 2, "entries": []}), "version 2 is not supported"),
    (json.dumps({"schema": "keydiff/mapping", "version": 1, "entries": [{"target": 3}]}), r"entries.0.source"),
])
def test_bad_mapping_files_are_exit_2(tmp_path, capsys, text, message):
    mapping = tmp_path / "map.json"
    mapping.write_text(text)
    ckpt = tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(1)}, str(ckpt))
    assert main(["apply", str(mapping), str(ckpt), "-o", str(tmp_path / "o.safetensors")]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "keydiff", "resnet18", str(path), "--debug"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.builds(lambda n: torch.zeros(n), st.integers(0, 3))),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_values)
def test_container_unwrapping_works_or_raises_keydiff_error(tmp_path, obj):
    path = tmp_path / "fuzz.pt"
    torch.save(obj, path)
    try:
        ckpt = read_checkpoint(path)
    except KeydiffError:
        return
    assert len(ckpt.keys) >= 1


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6))
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)
_entry = st.fixed_dictionaries({"source": _json, "target": _json, "op": _json, "source_shapes": _json,
                                "target_shape": _json, "confidence": _json, "evidence": _json})


@settings(max_examples=200, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries({
    "schema": st.just("keydiff/mapping"), "version": st.just(1), "entries": st.lists(_entry, max_size=3),
    "unwrap": _json, "rules": _json, "missing": _json, "unused": _json})))
def test_mapping_loader_works_or_raises_keydiff_error(doc):
    with contextlib.suppress(KeydiffError):
        KeyMap.from_json(doc)
