"""The command line: exit codes, one-line errors, outputs that never overwrite inputs, saved mappings."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from keydiff.cli import main

VIT = ["-m", "embed_dim=16", "-m", "depth=2", "-m", "num_heads=2", "-m", "img_size=16", "-m", "patch_size=8",
       "-m", "num_classes=0"]


def _vit_sd() -> dict[str, torch.Tensor]:
    import timm

    m = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=16, depth=2, num_heads=2, img_size=16,
                          patch_size=8, num_classes=0)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def renamed(tmp_path):
    """A timm ViT checkpoint under original-repo names (encoder.layers.N, class_embedding)."""
    sd = {("encoder.layers." + k[len("blocks."):] if k.startswith("blocks.") else k): v for k, v in _vit_sd().items()}
    sd["embeddings.class_embedding"] = sd.pop("cls_token").reshape(-1)
    path = tmp_path / "renamed.safetensors"
    save_file(sd, str(path))
    return path


def test_exit_0_writes_mapping_and_checkpoint(renamed, tmp_path, capsys):
    out, mapping = tmp_path / "out.safetensors", tmp_path / "map.json"
    before = _digest(renamed)
    assert main(["vit_base_patch16_224", str(renamed), *VIT, "--json", str(mapping), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "✓ all 30 model keys filled" in text
    assert "embeddings.class_embedding" in text and "reshape" in text
    assert _digest(renamed) == before
    doc = json.loads(mapping.read_text())
    assert doc["schema"] == "keydiff/mapping" and doc["version"] == 1 and doc["complete"]
    assert len(load_file(str(out))) == 30


def test_exit_1_when_unresolved_and_no_output_written(tmp_path, capsys):
    sd = _vit_sd()
    del sd["norm.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    out = tmp_path / "out.safetensors"
    assert main(["vit_base_patch16_224", str(path), *VIT, "-o", str(out)]) == 1
    assert not out.exists()
    report = capsys.readouterr().out
    assert "✗ 1 of 30 model keys unresolved" in report and "norm.weight" in report
    assert main(["vit_base_patch16_224", str(path), *VIT, "-o", str(out), "--partial", "-q"]) == 1
    assert len(load_file(str(out))) == 29


def test_output_over_an_input_is_refused(renamed, capsys):
    before = _digest(renamed)
    assert main(["vit_base_patch16_224", str(renamed), *VIT, "-o", str(renamed), "-q"]) == 2
    assert "input" in capsys.readouterr().err
    assert _digest(renamed) == before


@pytest.mark.parametrize(("args", "message"), [
    (["vit_bsae_patch16_224", "{ckpt}"],
     "unknown timm model 'vit_bsae_patch16_224'; did you mean vit_base_patch16_224"),
    (["vit_base_patch16_224", "{tmp}/missing.safetensors"], "no such file"),
    (["vit_base_patch16_224", "{ckpt}", "-m", "num_classes"], "is not KEY=VALUE"),
    (["vit_base_patch16_224", "{ckpt}", "--min-confidence", "7"], "min-confidence"),
    (["apply", "{tmp}/nope.json", "{ckpt}", "-o", "{tmp}/x.safetensors"], "cannot read the mapping file"),
    (["{ckpt}", "{ckpt}", "--source", "vit_base_patch16_224"], "--source runs the converted model"),
    (["vit_base_patch16_224", "{ckpt}", "-s", "depth=2"], "go with --source"),
    (["vit_base_patch16_224", "{ckpt}", *VIT, "--source", "vit_base_patch16_224", "-s", "depth=3"],
     "does not load into the source model"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, renamed, tmp_path, capsys):
    args = [a.format(ckpt=renamed, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_mapping_for_another_checkpoint_is_refused(renamed, tmp_path, capsys):
    mapping = tmp_path / "map.json"
    assert main(["vit_base_patch16_224", str(renamed), *VIT, "--json", str(mapping), "-q"]) == 0
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    assert main(["apply", str(mapping), str(other), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "the mapping needs" in capsys.readouterr().err


def test_model_args_are_python_literals(tmp_path):
    import timm

    m = timm.create_model("resnet18", pretrained=False, layers=[1, 1, 1, 1], num_classes=3)
    path = tmp_path / "r.pth"
    torch.save(m.state_dict(), path)
    assert main(["resnet18", str(path), "-m", "layers=[1,1,1,1]", "-m", "num_classes=3", "-q"]) == 0


def test_module_callable_and_checkpoint_as_model(renamed, tmp_path):
    target = tmp_path / "target.safetensors"
    save_file(_vit_sd(), str(target))
    assert main([str(target), str(renamed), "-q"]) == 0
    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / "mymodels.py").write_text(
            "import timm\n"
            "def tiny(**kw):\n"
            "    return timm.create_model('vit_base_patch16_224', embed_dim=16, depth=2, num_heads=2, img_size=16,"
            " patch_size=8, num_classes=0, **kw)\n")
        assert main(["mymodels:tiny", str(renamed), "-q"]) == 0
    finally:
        sys.path.remove(str(tmp_path))


def test_training_checkpoint_container_is_reported_and_selectable(tmp_path, capsys):
    sd = _vit_sd()
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "train.pth"
    torch.save({"model": sd, "model_ema": ema, "optimizer": {"state": {}}, "epoch": 3}, path)
    out = tmp_path / "o.safetensors"
    assert main(["vit_base_patch16_224", str(path), *VIT, "-o", str(out)]) == 0
    assert "weights taken from `model`; also present: `model_ema`" in capsys.readouterr().out
    assert torch.equal(load_file(str(out))["norm.weight"], sd["norm.weight"])
    assert main(["vit_base_patch16_224", str(path), *VIT, "--key", "model_ema", "-o", str(out), "-q"]) == 0
    assert torch.equal(load_file(str(out))["norm.weight"], ema["norm.weight"])


def test_console_script_runs_as_a_process(renamed):
    proc = subprocess.run([sys.executable, "-m", "keydiff", "vit_base_patch16_224", str(renamed), *VIT, "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run([sys.executable, "-m", "keydiff", "resnet18", str(renamed) + ".nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "keydiff", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "apply" in proc.stdout and "diff" in proc.stdout


def test_cli_conventions_version_h_and_completion(capsys):
    """Issue 13.8: --version, -h and tab completion."""
    from keydiff import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"keydiff {__version__}"
    assert main(["-h"]) == 0
    assert "--install-completion" in capsys.readouterr().out
    assert main(["diff", "-h"]) == 0
    assert "MODEL" in capsys.readouterr().out


def test_top_level_help_lists_every_command_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out[out.index("Commands:"):]
    for name in ("diff", "apply", "verify", "stats"):
        assert f"\n  {name} " in commands
    assert "..." not in commands  # descriptions are not cut
    assert "`keydiff MODEL CHECKPOINT` is the diff" in " ".join(out.split())
    assert main(["diff", "--help"]) == 0
    assert "MODEL" in capsys.readouterr().out.splitlines()[0]  # arguments shown by name
