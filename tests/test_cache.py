"""The model-key cache: a hit needs neither torch nor timm, a miss or a corrupt entry rebuilds and rewrites, and
``KEYDIFF_NO_CACHE`` turns it off. ``conftest.py`` gives every test an empty cache directory of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from keydiff._cache import cache_dir, cache_path, load_model_keys, store_model_keys
from keydiff._keys import KeySet, TensorInfo
from keydiff._model import read_model

TINY = dict(embed_dim=8, depth=1, num_heads=2, img_size=16, patch_size=8, num_classes=0)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KEYDIFF_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KEYDIFF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "keydiff"
    monkeypatch.setenv("KEYDIFF_NO_CACHE", "1")
    assert cache_dir() is None


def test_miss_builds_and_writes_then_hit_returns_the_same_keys():
    path = cache_path("vit_tiny_patch16_224", TINY)
    assert path is not None and not path.exists()
    built = read_model("vit_tiny_patch16_224", TINY)
    assert path.exists()
    cached = load_model_keys("vit_tiny_patch16_224", TINY)
    assert cached is not None
    assert list(cached.items()) == list(built.items())
    assert cached.origin == built.origin and cached.order_is_evidence


def test_key_depends_on_arguments_and_versions(monkeypatch):
    a = cache_path("vit_tiny_patch16_224", TINY)
    assert cache_path("vit_tiny_patch16_224", dict(TINY, depth=2)) != a
    assert cache_path("vit_tiny_patch16_224", dict(reversed(TINY.items()))) == a  # argument order does not matter
    from keydiff import _cache

    monkeypatch.setattr(_cache, "_versions", lambda: {"timm": "0.0", "torch": "0.0", "keydiff": "0.0"})
    assert cache_path("vit_tiny_patch16_224", TINY) != a


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"schema": "keydiff/model-keys"}', b"\xff\xfe"])
def test_corrupt_entry_is_ignored_and_rewritten(content):
    path = cache_path("vit_tiny_patch16_224", TINY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    assert load_model_keys("vit_tiny_patch16_224", TINY) is None
    keys = read_model("vit_tiny_patch16_224", TINY)
    assert json.loads(path.read_text())["keys"][0][0] == next(iter(keys))
    assert load_model_keys("vit_tiny_patch16_224", TINY) is not None


def test_disabled_cache_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("KEYDIFF_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("KEYDIFF_NO_CACHE", "1")
    read_model("vit_tiny_patch16_224", TINY)
    assert not (tmp_path / "c").exists()
    assert load_model_keys("vit_tiny_patch16_224", TINY) is None


def test_callables_are_never_cached():
    keys = KeySet.from_items([("w", TensorInfo((2,), "float32"))])
    assert cache_path("tests.models:build", {}) is None
    assert store_model_keys("tests.models:build", {}, keys) is None


def test_unwritable_cache_directory_only_costs_speed(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KEYDIFF_CACHE_DIR", str(blocker / "sub"))
    assert read_model("vit_tiny_patch16_224", TINY)  # builds, cannot cache, does not fail


def test_a_cache_hit_imports_neither_torch_nor_timm():
    read_model("vit_tiny_patch16_224", TINY)  # fills this test's cache directory
    code = ("import sys; from keydiff._model import read_model; "
            f"ks = read_model('vit_tiny_patch16_224', {TINY!r}); "
            "print(len(ks), 'torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout.split()
    assert out[1:] == ["False", "False"] and int(out[0]) > 0
