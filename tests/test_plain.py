"""Training checkpoints with plain data beside the weights load under weights_only; code stays refused (issue 13.1)."""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import pickle

import numpy as np
import pytest
import timm
import torch
from timm.utils.checkpoint_saver import CheckpointSaver
from timm.utils.model_ema import ModelEmaV3

from keydiff._sources import read_checkpoint
from keydiff.cli import main


def _timm_train_checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    """A checkpoint written the way timm's train.py writes it: CheckpointSaver with args, EMA and optimizer."""
    model = timm.create_model("resnet18", num_classes=10)
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=3, output=pathlib.Path("out"), amp=True)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            model_ema=ModelEmaV3(model), checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    return next(tmp_path.glob("checkpoint-0.pth.tar"))


def test_timm_train_checkpoint_loads_without_unsafe_pickle(tmp_path, capsys):
    path = _timm_train_checkpoint(tmp_path)
    ckpt = read_checkpoint(path)
    assert ckpt.container == "state_dict" and "state_dict_ema" in ckpt.alternatives
    assert main(["resnet18", str(path), "-m", "num_classes=10", "-q"]) == 0
    assert capsys.readouterr().err == ""


PLAIN = {
    "namespace": argparse.Namespace(lr=0.1, name="x"),
    "defaultdict": collections.defaultdict(list, {"a": [1]}),
    "path": pathlib.Path("/tmp/run"),
    "datetime": datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc),
    "timedelta": datetime.timedelta(seconds=3),
    "numpy scalar": np.float64(0.5),
    "numpy dtype": np.dtype("float32"),
    "numpy array": np.arange(4),
    "numpy random state": np.random.RandomState(0).get_state()[:3],
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_data_beside_the_weights_is_read(tmp_path, name):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": PLAIN[name], "epoch": 3}, path)
    assert list(read_checkpoint(path).keys) == ["w"]


def test_restricted_unpickler_rebuilds_plain_data():
    import io

    from keydiff._sources import _RestrictedUnpickler

    for value in PLAIN.values():
        data = pickle.dumps(value, protocol=2)
        loaded = _RestrictedUnpickler(io.BytesIO(data)).load()
        assert repr(loaded) == repr(dict(value) if isinstance(value, dict) else value)


def test_scoped_allowlist_leaves_torch_global_state_alone(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(a=1)}, path)
    read_checkpoint(path)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _Exec:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("payload", ["touch", "eval"])
def test_code_beside_plain_data_is_still_refused(tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    evil = _Payload(marker) if payload == "touch" else _Exec()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(a=1), "x": evil}, path)
    assert main(["resnet18", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--unsafe-pickle" in err and "nothing was executed" in err
    assert not marker.exists()
