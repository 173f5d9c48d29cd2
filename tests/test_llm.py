"""Language-model naming: GPT-2's transposed Conv1D weights, and Meta's original Llama names vs transformers'."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file, save_file

import keydiff
from keydiff.cli import main

from llm_models import META_NAMES, hf_gpt2, hf_llama, linear_gpt
from pairs import randomise


def test_gpt2_conv1d_weights_are_transposed_square_ones_included(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    src = randomise(hf_gpt2())
    path = tmp_path / "gpt2.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out = tmp_path / "out.safetensors"
    assert main(["llm_models:linear_gpt", str(path), "-o", str(out)]) == 0, capsys.readouterr().out
    dst = linear_gpt().eval()
    dst.load_state_dict(load_file(str(out)), strict=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = src(input_ids=ids).last_hidden_state, dst(ids)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_meta_llama_names_map_to_transformers_names_and_rotary_rows_stay_unproven(tmp_path, capsys):
    """Checkpoint vs checkpoint: every name maps, but a file says nothing of the head count or the model's rotary
    pairing, while Meta's names say the checkpoint's rows are interleaved: q and k stay unproven (issue 11)."""
    model = hf_llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {}
    for k, v in sd.items():
        for pattern, repl in META_NAMES:
            if re.search(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        meta[k] = v
    hf_path, meta_path = tmp_path / "hf.safetensors", tmp_path / "meta.safetensors"
    save_file(sd, str(hf_path))
    save_file(meta, str(meta_path))
    assert main([str(hf_path), str(meta_path), "-q"]) == 1
    d = keydiff.diff(str(hf_path), str(meta_path))
    rotary = {k for k in sd if ".q_proj." in k or ".k_proj." in k}
    assert {m.key for m in d.mapping.missing} == rotary
    assert all("unproven rotary layout" in m.reason for m in d.mapping.missing)
    renamed = {k: re.sub(p, r, k) for k in sd for p, r in META_NAMES if re.search(p, k)}
    for e in d.mapping.entries:
        assert e.source == (renamed[e.target],) and e.op.kind == "rename", e
    assert len(d.mapping.entries) == len(sd) - len(rotary)
