"""Targets built from a library's configuration (issue 11): ``diffusers:Class`` and ``transformers:Class`` with
``-m`` config arguments, and folders whose ``config.json`` names a diffusers class (``_class_name``); misspelt
classes and arguments are one-line errors that suggest the close names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from keydiff.cli import main

from pairs import randomise

VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
           sample_size=16)
VAE_ARGS = [a for k, v in VAE.items() for a in ("-m", f"{k}={v!r}")]


def _vae():
    from diffusers import AutoencoderKL

    return randomise(AutoencoderKL(**VAE))


def test_diffusers_class_with_config_arguments(tmp_path, capsys):
    sd = {f"vae.{k}": v.detach().clone().contiguous() for k, v in _vae().state_dict().items()}
    save_file(sd, str(tmp_path / "wrapped.safetensors"))
    assert main(["diffusers:AutoencoderKL", str(tmp_path / "wrapped.safetensors"), *VAE_ARGS]) == 0
    out = capsys.readouterr().out
    assert f"all {len(sd)} model keys filled" in out and "`vae.`" in out


def test_diffusers_folder_and_class_take_the_saved_config(tmp_path, capsys):
    _vae().save_pretrained(tmp_path / "vae")  # config.json (_class_name) + diffusion_pytorch_model.safetensors
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    assert main([str(tmp_path / "vae"), str(weights)]) == 0  # the folder is the model its config describes
    assert main(["diffusers:AutoencoderKL", str(weights), "-q"]) == 0  # no -m: sized by the folder's config.json
    # -m goes on top of the saved config: a wider model no longer fits
    assert main(["diffusers:AutoencoderKL", str(weights), "-m", "block_out_channels=(8, 32)", "-q"]) == 1


@pytest.mark.parametrize(("spec", "args", "message"), [
    ("diffusers:AutoencoderKLL", [], "diffusers has no model class 'AutoencoderKLL'; did you mean AutoencoderKL"),
    ("diffusers:get_logger", [], "diffusers has no model class 'get_logger'"),
    ("diffusers:AutoencoderKL", ["-m", "latent_chanels=4"],
     "diffusers:AutoencoderKL has no configuration argument 'latent_chanels'; did you mean latent_channels?"),
    ("transformers:BertModle", [], "transformers has no model class 'BertModle'; did you mean BertModel"),
    ("transformers:BertModel", ["-m", "hiden_size=16"],
     "transformers:BertModel has no configuration argument 'hiden_size'; did you mean hidden_size?"),
    ("resnet18", ["--source", "transformers:BertModel", "-s", "num_hiden_layers=1"],
     "transformers:BertModel has no configuration argument 'num_hiden_layers'; did you mean num_hidden_layers?"),
])
def test_unknown_class_or_argument_is_one_line_exit_2(tmp_path, capsys, spec, args, message):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert main([spec, str(tmp_path / "x.safetensors"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_transformers_config_arguments_consumed_by_the_config_are_accepted(tmp_path):
    """An argument the config folds into another (``rope_theta`` into ``rope_parameters``) is not refused."""
    from transformers import LlamaConfig, LlamaModel

    args = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_theta=5e5)
    model = LlamaModel(LlamaConfig(**args))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    cli = [a for k, v in args.items() for a in ("-m", f"{k}={v!r}")]
    assert main(["transformers:LlamaModel", str(tmp_path / "m.safetensors"), *cli, "-q"]) == 0


def test_a_config_files_old_fields_are_tolerated_as_the_libraries_do(tmp_path):
    """Only the arguments typed with -m are checked: a saved config.json may carry fields its class no longer takes
    (transformers keeps them as attributes, diffusers' from_config drops them)."""
    import json

    from transformers import BertConfig, BertModel

    _vae().save_pretrained(tmp_path / "vae")
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24)).save_pretrained(tmp_path / "bert")
    for folder in ("vae", "bert"):
        cfg = json.loads((tmp_path / folder / "config.json").read_text())
        (tmp_path / folder / "config.json").write_text(json.dumps({**cfg, "a_field_of_an_older_release": 1}))
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    assert main([str(tmp_path / "vae"), str(weights), "-q"]) == 0
    assert main(["diffusers:AutoencoderKL", str(weights), "-q"]) == 0
    assert main(["transformers:BertModel", str(tmp_path / "bert"), "-q"]) == 0
    assert main([str(tmp_path / "bert"), str(tmp_path / "bert" / "model.safetensors"), "-q"]) == 0
