"""The command line's inspection and sharing options: ``stats``, ``--values``, ``--report``, ``--emit-python``."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from keydiff.cli import main

from pairs import CORE_PAIRS, write_source

PAIR = next(p for p in CORE_PAIRS if p.name == "hf_vit")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An HF ViT checkpoint, the converted timm checkpoint, and a copy with a NaN, an Inf and an all-zero tensor."""
    directory = tmp_path_factory.mktemp("cli")
    source, _ = write_source(PAIR, directory)
    converted = directory / "converted.safetensors"
    assert main([PAIR.target, str(source), *PAIR.model_args(), "-o", str(converted), "-q"]) == 0
    sd = load_file(str(source))
    sd["layers.0.mlp.fc1.weight"][1, 2] = float("nan")
    sd["layers.1.mlp.fc2.bias"][0] = float("inf")
    sd["layernorm.bias"].zero_()
    broken = directory / "broken.safetensors"
    save_file(sd, str(broken))
    return source, converted, broken


def test_stats_flags_nan_inf_and_all_zero_first_and_exits_1(files, tmp_path, capsys):
    _, _, broken = files
    table = tmp_path / "stats.csv"
    assert main(["stats", str(broken), "--csv", str(table)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("✗ 40 tensors, 24,960 values: 1 with NaN, 1 with Inf, 1 all zero")
    flagged = out[out.index("Flagged tensors"):]
    for key, flag in (("layernorm.bias", "all zero"), ("layers.0.mlp.fc1.weight", "nan"),
                      ("layers.1.mlp.fc2.bias", "inf")):
        line = next(row for row in flagged.splitlines() if key in row)
        assert flag in line
    assert "37 tensors not flagged; use --all to list them" in out
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 40 and {r["key"]: r["flag"] for r in rows if r["flag"]} == {
        "layernorm.bias": "all zero", "layers.0.mlp.fc1.weight": "nan", "layers.1.mlp.fc2.bias": "inf"}


def test_stats_of_a_clean_checkpoint_exits_0_and_all_lists_every_tensor(files, capsys):
    source, _, _ = files
    assert main(["stats", str(source), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("✓ 40 tensors, 24,960 values, all finite, none all zero")
    assert "All tensors" in out and "pooler.dense.weight" in out


def test_values_confirm_a_conversion_bit_exact(files, capsys):
    source, converted, _ = files
    assert main([str(converted), str(source), "--values"]) == 0
    out = capsys.readouterr().out
    assert "✓ all 30 compared tensors are bit-identical" in out
    assert "2 tensors of B not compared (unused by the mapping)" in out


def test_values_show_what_changed_by_cluster(files, capsys):
    _, converted, broken = files
    assert main([str(converted), str(broken), "--values"]) == 0  # the keys all match: exit 0
    out = capsys.readouterr().out
    assert "✗ 3 of 30 compared tensors changed (27 bit-identical); 2 with no finite change" in out
    rows = out[out.index("Value changes by cluster"):].splitlines()
    assert "blocks.{0,1}.mlp.fc1.weight" in rows[4] and "nan" in rows[4]  # most changed first


@pytest.mark.parametrize(("args", "message"), [
    (["vit_base_patch16_224", "{source}", "--values"], "--values compares the values of two checkpoints"),
    (["{converted}", "{source}", "--report", "{tmp}/report.txt"], "the suffix picks the format: .md"),
    (["stats", "{tmp}/missing.safetensors"], "no such file"),
    (["stats", "{source}", "--report", "{tmp}/r.pdf"], "the suffix picks the format"),
])
def test_bad_options_are_one_line_and_exit_2(files, tmp_path, capsys, args, message):
    source, converted, _ = files
    args = [a.format(source=source, converted=converted, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_reports_are_written_as_markdown_and_html(files, tmp_path, capsys):
    source, converted, _ = files
    md, page = tmp_path / "report.md", tmp_path / "report.html"
    assert main([PAIR.target, str(source), *PAIR.model_args(), "--report", str(md)]) == 0
    assert main([str(converted), str(source), "--values", "--report", str(page)]) == 0
    out = capsys.readouterr().out
    assert f"report written to {md}" in out and f"report written to {page}" in out
    text = md.read_text()
    assert text.startswith("**✓ all 30 model keys filled")
    assert "| checkpoint | model | keys | op | conf. | evidence |" in text
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "Value changes by cluster" in html
    assert "https://" not in html
    assert (md.stat().st_mode & 0o777) != 0o600  # not left private by the temporary file


def test_outputs_never_overwrite_an_input(files, tmp_path, capsys):
    source, _, _ = files
    # a checkpoint may carry any name, even one that looks like a report
    odd = tmp_path / "ckpt.md"
    odd.write_bytes(source.read_bytes())
    before = _digest(odd)
    assert main([PAIR.target, str(odd), *PAIR.model_args(), "--report", str(odd)]) == 2
    assert "refusing to write the report over an input file" in capsys.readouterr().err
    py = tmp_path / "ckpt.py"
    py.write_bytes(source.read_bytes())
    assert main([PAIR.target, str(py), *PAIR.model_args(), "--emit-python", str(py)]) == 2
    assert "refusing to write the generated code over an input file" in capsys.readouterr().err
    table = tmp_path / "ckpt.csv"
    table.write_bytes(source.read_bytes())
    assert main(["stats", str(table), "--csv", str(table)]) == 2
    assert "refusing to write the statistics over an input file" in capsys.readouterr().err
    assert _digest(odd) == before and _digest(py) == _digest(table) == _digest(source)


def test_emit_python_waits_for_a_complete_mapping_unless_partial(files, tmp_path, capsys):
    source, _, _ = files
    sd = load_file(str(source))
    del sd["layernorm.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(sd, str(partial))
    code = tmp_path / "filter.py"
    assert main([PAIR.target, str(partial), *PAIR.model_args(), "--emit-python", str(code)]) == 1
    assert not code.exists() and "no code written" in capsys.readouterr().out
    assert main([PAIR.target, str(partial), *PAIR.model_args(), "--emit-python", str(code), "--partial", "-q"]) == 1
    assert "INCOMPLETE: 2 model keys" in " ".join(code.read_text().split())  # norm.{weight,bias}


def test_help_names_the_new_command_and_options_without_importing_torch():
    probe = ("import sys\nfrom keydiff.cli import main\nmain(['--help'])\nmain(['stats', '--help'])\n"
             "main(['diff', '--help'])\nprint(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("[]")
    for option in ("keydiff stats CHECKPOINT", "--csv", "--values", "--report", "--emit-python"):
        assert option in proc.stdout


VIT_TINY = ["vit_base_patch16_224", "fixtures/vit_tiny_renamed.safetensors", "-m", "embed_dim=16", "-m", "depth=2",
            "-m", "num_heads=2", "-m", "img_size=16", "-m", "patch_size=8", "-m", "num_classes=0"]


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_output_suffix_picks_a_torch_file(tmp_path, suffix):
    """Issue 13.5: -o out.pth wrote safetensors, which torch.load cannot read."""
    import timm
    import torch

    out = tmp_path / f"out{suffix}"
    assert main([*VIT_TINY, "-o", str(out), "-q"]) == 0
    sd = torch.load(out, weights_only=True)
    model = timm.create_model("vit_base_patch16_224", embed_dim=16, depth=2, num_heads=2, img_size=16,
                              patch_size=8, num_classes=0)
    model.load_state_dict(sd, strict=True)


@pytest.mark.parametrize(("output", "message"), [
    ("out.txt", "the suffix picks the format"),
    ("missing/out.safetensors", "does not exist"),
    ("fixtures/vit_tiny_renamed.safetensors", "over an input file"),
])
def test_bad_output_is_refused_before_any_work(tmp_path, capsys, output, message, monkeypatch):
    monkeypatch.setattr("keydiff._diff.diff", lambda *a, **k: pytest.fail("work done before checking -o"))
    target = output if output.startswith("fixtures") else str(tmp_path / output)
    assert main([*VIT_TINY, "-o", target]) == 2
    assert message in capsys.readouterr().err
