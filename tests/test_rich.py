"""The terminal report: the next step follows from what was found (issue 13.3)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import keydiff
from keydiff._render._group import group_entries
from keydiff._render._rich import next_step
from keydiff.cli import main

VIT = ["vit_base_patch16_224", "fixtures/vit_tiny_renamed.safetensors", "-m", "embed_dim=16", "-m", "depth=2",
       "-m", "num_heads=2", "-m", "img_size=16", "-m", "patch_size=8", "-m", "num_classes=0"]


def _next_line(out: str) -> str:
    return " ".join(out[out.rindex("Next:"):].split())


def test_next_does_not_ask_for_the_output_it_was_given(tmp_path, capsys):
    out_path = tmp_path / "converted.safetensors"
    assert main([*VIT, "-o", str(out_path)]) == 0
    line = _next_line(capsys.readouterr().out)
    assert "add -o" not in line and str(out_path) in line


def test_next_says_nothing_to_convert_when_it_loads_as_it_is():
    model = timm.create_model("resnet18", num_classes=10)
    d = keydiff.diff(model, model.state_dict())
    assert next_step(d) == "Next: nothing to convert: the checkpoint loads into the model as it is (strict=True)."


def _resnet(tmp_path, **kwargs):
    path = tmp_path / "resnet.safetensors"
    with torch.device("meta"):
        model = timm.create_model("resnet18", **kwargs)
    save_file({k: torch.zeros(v.shape) for k, v in model.state_dict().items()}, str(path))
    return path


def test_next_follows_the_head_cause(tmp_path):
    d = keydiff.diff("resnet18", str(_resnet(tmp_path)), num_classes=10)
    line = next_step(d)
    assert "head is re-initialised" in line and "lacks" not in line and "--partial converts what fits" in line
    assert "--partial converts" not in next_step(d, partial=True)


def test_next_does_not_offer_partial_when_nothing_fits(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"a.weight": torch.zeros(3, 5), "b.bias": torch.zeros(7)}, str(path))
    d = keydiff.diff("resnet18", str(path))
    assert "--partial" not in next_step(d) and "checkpoint for this model" in next_step(d)


def test_str_and_repr_of_a_diff_are_a_short_summary(capsys):
    """Issue 13.6: print(d) in a plain interpreter dumped a 30,000-85,000-character dataclass."""
    import io

    from rich.console import Console

    d = keydiff.diff(*VIT[:2], embed_dim=16, depth=2, num_heads=2, img_size=16, patch_size=8, num_classes=0)
    for text in (str(d), repr(d), repr(d.mapping), repr(d.model)):
        assert len(text) < 400, text
    assert repr(d).startswith("Diff(✓ all 30 model keys filled") and "0 missing" in repr(d)
    console = Console(file=io.StringIO(), width=120)
    console.print(d)
    assert "Proposed mapping" in console.file.getvalue()  # rich keeps the full report
    assert "Proposed mapping" in d._repr_mimebundle_()["text/plain"]  # and Jupyter


def _cells(report: str, column: int) -> list[list[str]]:
    """The fragments of one table column, grouped per row (a row continues while the `keys`/`n` cell is empty)."""
    rows: list[list[str]] = []
    for line in report.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[2 if column < 2 else 1] or not rows:  # a count cell opens a new row
            rows.append([])
        if cells[column]:
            rows[-1].append(cells[column])
    return rows


@pytest.mark.parametrize("width", [80, 100, 120])
def test_tables_never_break_a_key_mid_token(width):
    """Issue 13.8: keys wrap at `.` (or fold a token wider than the column), never in the middle of a token."""
    from keydiff._render._rich import render_text

    d = keydiff.diff(*VIT[:2], embed_dim=16, depth=2, num_heads=2, img_size=16, patch_size=8, num_classes=0)
    report = render_text(d, width=width, budget=100)
    keys = {g.source for g in group_entries(d.mapping.entries)} | {g.target for g in group_entries(d.mapping.entries)}
    for column in (0, 1):
        for fragments in _cells(report[report.index("Proposed mapping"):], column):
            joined = "".join(fragments)
            assert joined in keys, (joined, report)
            assert all(f.endswith(".") for f in fragments[:-1]), (fragments, report)
