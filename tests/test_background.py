"""Reading one side on the other core: the same key set as reading it here, or nothing (and the caller reads)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from test_scale import moe_pair, write_header

from keydiff import _background, _diff
from keydiff._background import BackgroundKeys
from keydiff._keys import KeySet, TensorInfo
from keydiff._sources import read_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child is forked on Linux only")


@pytest.fixture(autouse=True)
def _fork_with_torch_loaded(monkeypatch):
    """Other test modules load torch; these children run only Python code, so let them fork anyway."""
    monkeypatch.setattr(_background, "THREADED_MODULES", ())


def test_no_fork_once_torch_is_loaded(monkeypatch):
    monkeypatch.setattr(_background, "THREADED_MODULES", ("keydiff",))  # loaded, as torch would be
    assert BackgroundKeys(_keys).result() is None


def _keys() -> KeySet:
    items = [(f"layers.{n}.w{i}", TensorInfo((n + 1, i), "bfloat16" if i % 2 else "float32"))
             for n in range(50) for i in range(3)]
    return KeySet.from_items(items, origin="here", order_is_evidence=False)


def test_the_childs_key_set_is_the_one_read_here():
    got = BackgroundKeys(_keys).result()
    assert got == _keys()
    assert (got.origin, got.order_is_evidence) == ("here", False)
    assert list(got) == list(_keys())


def test_a_failing_child_gives_nothing_and_the_caller_reads_itself():
    def broken() -> KeySet:
        raise RuntimeError("boom")

    assert BackgroundKeys(broken).result() is None


def test_no_fork_while_other_threads_run():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert BackgroundKeys(_keys).result() is None
    finally:
        stop.set()
        t.join()


def test_diff_of_two_safetensors_files_is_the_same_read_either_way(tmp_path, monkeypatch):
    pairs = moe_pair(layers=12, experts=4)  # layers.10 sorts before layers.2 in the file, not in the model
    a, b = tmp_path / "original.safetensors", tmp_path / "hf.safetensors"
    write_header(a, [(o, s) for o, _, s in pairs])
    write_header(b, [(h, s) for _, h, s in pairs])
    calls = []
    monkeypatch.setattr(_background.BackgroundKeys, "result",
                        lambda self, _r=_background.BackgroundKeys.result: calls.append(1) or _r(self))
    monkeypatch.setattr(_background, "MIN_BYTES", 0)
    forked = _diff.diff(str(a), str(b))
    monkeypatch.setattr(_background, "MIN_BYTES", 1 << 60)
    here = _diff.diff(str(a), str(b))
    assert calls == [1]
    assert forked.model == here.model and list(forked.model) == list(here.model)
    assert forked.mapping.entries == here.mapping.entries
    assert read_checkpoint(a).keys.items_ != here.model.items_  # the model side was put in structural order


def test_a_child_given_up_on_is_reaped(tmp_path):
    """The checkpoint side failed first: the child is stopped and reaped, not left blocked on its pipe."""
    big = KeySet.from_items([(f"k.{i}", TensorInfo((i,), "float32")) for i in range(200_000)], origin="big")
    background = BackgroundKeys(lambda: big)
    background.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child left


def test_a_bad_checkpoint_beside_a_large_model_file_is_reported_and_leaves_no_child(tmp_path, monkeypatch):
    from keydiff._errors import CheckpointError

    pairs = moe_pair(layers=2, experts=4)
    a = tmp_path / "original.safetensors"
    write_header(a, [(o, s) for o, _, s in pairs])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    monkeypatch.setattr(_background, "MIN_BYTES", 0)
    with pytest.raises(CheckpointError):
        _diff.diff(str(a), str(bad))
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_the_checkpoint_folded_while_waiting_serves_the_engine(tmp_path, monkeypatch):
    """While the child reads the model's header, the checkpoint's keys are folded; the engine takes that fold
    (nothing matched by name, no prefix) and answers as it does without it."""
    pairs = moe_pair(layers=3, experts=6)
    a, b = tmp_path / "original.safetensors", tmp_path / "hf.safetensors"
    write_header(a, [(o, s) for o, _, s in pairs])
    write_header(b, [(h, s) for _, h, s in pairs])
    monkeypatch.setattr(_diff, "FOLD_MIN_KEYS", 0)
    monkeypatch.setattr(_diff, "FOLD_MIN_SHARE", 0.0)
    given = []
    monkeypatch.setattr(_diff, "_match_folded", lambda *args, _f=_diff._match_folded: given.append(args[-1]) or
                        _f(*args))
    monkeypatch.setattr(_background, "MIN_BYTES", 0)
    ahead = _diff.diff(str(a), str(b))
    monkeypatch.setattr(_background, "MIN_BYTES", 1 << 60)
    here = _diff.diff(str(a), str(b))
    assert given[0] is not None and given[1] is None
    assert ahead.ok and ahead.mapping.entries == here.mapping.entries
