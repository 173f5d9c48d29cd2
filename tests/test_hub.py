"""Hugging Face inputs, offline, from a fake cache in tmp_path (issue 13.7): repo ids, hf-hub: names, cache
folders, config folders. Nothing is downloaded."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from keydiff.cli import main

from pairs import CORE_PAIRS, hf_vit

VIT_ARGS = next(p for p in CORE_PAIRS if p.name == "hf_vit").model_args()


def _cache_repo(cache, repo: str, write) -> None:
    """A hub cache entry as huggingface_hub lays it out: refs/main names the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    old = folder / "snapshots" / "ffff0000"
    old.mkdir(parents=True)  # an older snapshot without files: refs/main decides
    write(folder / "snapshots" / "0123abcd")


def _hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _cache_repo(cache, "google/vit-tiny", lambda p: hf_vit().save_pretrained(p))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_repo_id_is_read_from_the_local_cache(tmp_path, monkeypatch, capsys):
    _hf_cache(tmp_path, monkeypatch)
    assert main(["vit_base_patch16_224", "google/vit-tiny", *VIT_ARGS]) == 0, capsys.readouterr()


def test_cache_folder_stands_for_its_snapshot(tmp_path, monkeypatch, capsys):
    cache = _hf_cache(tmp_path, monkeypatch)
    assert main(["vit_base_patch16_224", str(cache / "models--google--vit-tiny"), *VIT_ARGS]) == 0


def test_repo_not_in_the_cache_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    _hf_cache(tmp_path, monkeypatch)
    assert main(["vit_base_patch16_224", "google/vit-other"]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "hf download google/vit-other" in err


def test_hf_home_is_respected(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    _cache_repo(tmp_path / "hub", "google/vit-tiny", lambda p: hf_vit().save_pretrained(p))
    assert main(["vit_base_patch16_224", "google/vit-tiny", *VIT_ARGS, "-q"]) == 0


def test_transformers_class_takes_the_checkpoint_folders_config(tmp_path, monkeypatch, capsys):
    cache = _hf_cache(tmp_path, monkeypatch)
    folder = cache / "models--google--vit-tiny" / "snapshots" / "0123abcd"
    assert main(["transformers:ViTModel", str(folder), "-q"]) == 0  # no -m: the sizes come from config.json


def test_config_folder_as_model_builds_it_from_config(tmp_path, monkeypatch, capsys):
    cache = _hf_cache(tmp_path, monkeypatch)
    folder = cache / "models--google--vit-tiny" / "snapshots" / "0123abcd"
    assert main([str(folder), str(folder / "model.safetensors"), "-q"]) == 0
    assert main(["google/vit-tiny", str(folder / "model.safetensors")]) == 0
    assert "model: google/vit-tiny" in capsys.readouterr().out


def test_hf_hub_timm_name_is_built_from_the_cached_config(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = timm.create_model("resnet18", num_classes=7)

    def write(path):
        path.mkdir(parents=True)
        save_config_for_hf(model, str(path / "config.json"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))

    _cache_repo(cache, "timm/resnet18.test", write)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({f"module.{k}": torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}, str(ckpt))
    assert main(["hf-hub:timm/resnet18.test", str(ckpt), "-q"]) == 0
    assert main(["hf-hub:timm/not-cached", str(ckpt)]) == 2
    assert "hf download timm/not-cached" in capsys.readouterr().err
