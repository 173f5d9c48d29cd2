"""Folds: identical repeats are matched once, and the folded answer is the full engine's answer or is not used."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keydiff import _diff, _fold
from keydiff._diff import compare_keys
from keydiff._fold import fold_keys
from keydiff._keys import KeySet, TensorInfo

DIM, KV, FFN = 8, 4, 16


def _moe(layers: int, experts: int, *, hf: bool, prefix: str = "") -> KeySet:
    """A tiny MoE decoder under Mixtral (``hf``) or original Mistral names."""
    items: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight" if hf else "tok_embeddings.weight",
                                                 (32, DIM))]
    for n in range(layers):
        base = f"model.layers.{n}." if hf else f"layers.{n}."
        for a in "qkvo":
            name = f"self_attn.{a}_proj" if hf else f"attention.w{a}"
            items.append((f"{base}{name}.weight", (KV if a in "kv" else DIM, DIM)))
        moe = "block_sparse_moe" if hf else "feed_forward"
        items.append((f"{base}{moe}.gate.weight", (experts, DIM)))
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                items.append((f"{base}{moe}.experts.{e}.{w}.weight", (DIM, FFN) if w == "w2" else (FFN, DIM)))
        items.append((f"{base}{'input_layernorm' if hf else 'attention_norm'}.weight", (DIM,)))
        items.append((f"{base}{'post_attention_layernorm' if hf else 'ffn_norm'}.weight", (DIM,)))
    items += [("model.norm.weight" if hf else "norm.weight", (DIM,)),
              ("lm_head.weight" if hf else "output.weight", (32, DIM))]
    return KeySet.from_items(((prefix + k, TensorInfo(s, "bfloat16")) for k, s in sorted(items)), origin="moe",
                             order_is_evidence=False)


def _answer(model: KeySet, checkpoint: KeySet, fold: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    monkeypatch.setattr(_diff, "FOLD_MIN_KEYS", 0 if fold else 10**12)
    monkeypatch.setattr(_diff, "FOLD_MIN_SHARE", 0.0)
    d = compare_keys(model, checkpoint)
    entries = sorted((e.source, e.target, e.op) for e in d.mapping.entries)
    return entries, sorted(m.key for m in d.mapping.missing), sorted(u.key for u in d.mapping.unused)


def test_fold_keeps_one_child_of_identical_repeats():
    w = TensorInfo((4, 2), "float32")
    keys = [f"blocks.{b}.experts.{e}.{n}.weight" for b in range(2) for e in range(3) for n in ("w1", "w2")]
    f = fold_keys(keys, dict.fromkeys(keys, w))
    assert f.keys == ("blocks.0.experts.0.w1.weight", "blocks.0.experts.0.w2.weight",
                      "blocks.1.experts.0.w1.weight", "blocks.1.experts.0.w2.weight")
    assert [(fold.container, fold.tokens) for fold in f.folds] == [("blocks.0.experts", ("0", "1", "2")),
                                                                    ("blocks.1.experts", ("0", "1", "2"))]
    assert f.dropped == 8


def test_children_that_differ_stay_out_of_the_fold_and_odd_tokens_are_not_folded():
    w, v = TensorInfo((4, 2), "float32"), TensorInfo((2, 4), "float32")
    keys = [f"experts.{e}.w1.weight" for e in range(4)]
    f = fold_keys(keys, {**dict.fromkeys(keys, w), keys[2]: v})  # one child has another shape
    (fold,) = f.folds
    assert (fold.tokens, fold.complete) == (("0", "1", "3"), False)
    assert "experts.2.w1.weight" in f.keys and f.dropped == 2  # the odd child is matched on its own
    other = [*keys[:3], "experts.3.w2.weight"]  # one child holds another name
    assert fold_keys(other, dict.fromkeys(other, w)).folds[0].tokens == ("0", "1", "2")
    assert not fold_keys(keys[:2], {keys[0]: w, keys[1]: v}).folds  # no two children alike
    padded = ["experts.00.w1.weight", "experts.01.w1.weight"]
    assert not fold_keys(padded, dict.fromkeys(padded, w)).folds
    assert not fold_keys(keys[:1], dict.fromkeys(keys, w)).folds  # a single child is no repeat


def test_folds_pair_only_over_the_same_indices():
    """Ranks over different index sets would cross children: 0,1,3 against 0,2,3 must not pair 1 with 2."""
    from keydiff._fold import Fold

    def fold(tokens: tuple[str, ...], complete: bool) -> Fold:
        return Fold("experts", tokens, tuple(f"experts.{t}" for t in tokens), tuple(map(int, tokens)), 0, complete)

    assert not fold(("0", "1", "3"), False).pairs_with(fold(("0", "2", "3"), False))
    assert fold(("0", "1", "3"), False).pairs_with(fold(("0", "1", "3"), True))
    assert not fold(("0", "1", "2"), True).pairs_with(fold(("1", "2", "3"), True))  # renumbered: the full engine
    assert not fold(("0", "1"), True).pairs_with(fold(("0", "1", "2"), True))


def test_copies_carry_the_representatives_template_with_their_own_index():
    from keydiff._patterns import _parse_template, template_of

    w = TensorInfo((4, 2), "float32")
    keys = [f"layers.{n}.experts.{e}.w1.weight" for n in range(2) for e in range(4)]
    f = fold_keys(keys, dict.fromkeys(keys, w))
    fold = f.fold_of["layers.1.experts.0.w1.weight"]
    copies = _fold._copies(fold, "layers.1.experts.0.w1.weight")
    assert copies == [f"layers.1.experts.{e}.w1.weight" for e in range(4)]
    assert [template_of(k) for k in copies] == [_parse_template(k) for k in copies]


@settings(max_examples=15, deadline=None)
@given(layers=st.integers(1, 4), experts=st.integers(2, 12), prefix=st.sampled_from(["", "module."]))
def test_folded_answer_is_the_full_engines_answer(layers, experts, prefix):
    with pytest.MonkeyPatch.context() as mp:
        model, ckpt = _moe(layers, experts, hf=False), _moe(layers, experts, hf=True, prefix=prefix)
        folded = _answer(model, ckpt, True, mp)
        assert folded == _answer(model, ckpt, False, mp)
        assert not folded[1] and not folded[2]


@pytest.mark.parametrize(("model_experts", "ckpt_experts"), [(8, 6), (6, 8)])
def test_repeats_over_other_index_sets_are_cut_to_the_common_ones_and_give_the_full_engines_answer(
        monkeypatch, model_experts, ckpt_experts):
    model, ckpt = _moe(2, model_experts, hf=False), _moe(2, ckpt_experts, hf=True)
    calls = []
    monkeypatch.setattr(_diff, "can_pair", lambda *a: calls.append(_fold.can_pair(*a)) or calls[-1])
    folded = _answer(model, ckpt, True, monkeypatch)
    assert folded == _answer(model, ckpt, False, monkeypatch)
    assert calls == [False, True]  # refused as folded, paired once both sides fold experts 0-5 only
    assert folded[1] or folded[2]  # the counts differ: something is left over, and said so
    extra = {k.split(".experts.")[1].split(".")[0] for k in folded[1] + folded[2] if ".experts." in k}
    assert extra == {"6", "7"}  # the experts one side lacks, reported, with their own numbers (and the gates)


def test_aligned_folds_leave_the_odd_children_as_plain_keys_with_their_indices():
    model = _moe(3, 6, hf=False)
    ckpt = _without(_moe(3, 6, hf=True), lambda k: k == "model.layers.1.block_sparse_moe.experts.4.w2.weight")
    rest_m, rest_c = list(model), list(ckpt)
    fm, fc = fold_keys(rest_m, model), fold_keys(rest_c, ckpt)
    assert not _fold.can_pair(fc, fm)
    am, ac = _fold.align_folds(fm, fc, rest_m, rest_c, model, ckpt)
    assert _fold.can_pair(ac, am)
    experts = [f for f in [*am.folds, *ac.folds] if f.container.endswith("experts")]
    assert len(experts) == 6 and {f.values for f in experts} == {(0, 1, 2, 3, 5)}
    # expert 4 in full on both sides, in every layer (the hole is one key of one of them), nothing else of it hidden
    assert sum(".experts.4." in k for k in am.keys) == 9 and sum(".experts.4." in k for k in ac.keys) == 8
    assert len(am.keys) + am.dropped == len(rest_m) and len(ac.keys) + ac.dropped == len(rest_c)
    hidden_c = set(rest_c) - set(ac.keys)
    assert all(ac.fold_of.get(k.replace(f".experts.{k.split('.experts.')[1].split('.')[0]}.", ".experts.0."))
               for k in hidden_c if ".experts." in k)


def test_per_expert_keys_against_packed_experts_are_not_folded_into_a_wrong_answer(monkeypatch):
    """Packed experts (one [E, ...] tensor) have no repeats to fold; the per-expert side's fold must not pair."""
    per_expert = _moe(2, 4, hf=False)
    packed = KeySet.from_items(
        [(k, i) for k, i in per_expert.items() if ".experts." not in k]
        + [(f"layers.{n}.feed_forward.experts.{w}", TensorInfo((4, *((DIM, FFN) if w == "w2" else (FFN, DIM))),
                                                               "bfloat16"))
           for n in range(2) for w in ("w1", "w2", "w3")], origin="packed")
    assert _answer(packed, per_expert, True, monkeypatch) == _answer(packed, per_expert, False, monkeypatch)


def _corpus():
    from pairs import CORPUS_PAIRS
    from test_corpus import NEGATIVE

    return [*CORPUS_PAIRS, *(p for _, p in NEGATIVE)]


@pytest.mark.parametrize("pair", _corpus(), ids=lambda p: p.name)
def test_forcing_folds_on_real_pairs_changes_no_answer(pair, tmp_path, monkeypatch):
    """Blocks of a ViT, stages of a ResNet: forced to fold even when small, every corpus pair (negatives too) gets
    the full engine's answer, or the fold steps aside."""
    from keydiff._model import read_model
    from keydiff._sources import read_checkpoint

    from pairs import write_source

    path, _ = write_source(pair, tmp_path)
    model = read_model(pair.target, pair.target_kwargs)
    ckpt = read_checkpoint(path).keys
    assert _answer(model, ckpt, True, monkeypatch) == _answer(model, ckpt, False, monkeypatch)


def _without(ks: KeySet, drop) -> KeySet:
    return KeySet.from_items([(k, i) for k, i in ks.items() if not drop(k)], origin=ks.origin,
                             order_is_evidence=ks.order_is_evidence)


_DEFECTS = {
    "a tensor missing in the checkpoint": (lambda k: False,
                                           lambda k: k == "model.layers.2.block_sparse_moe.experts.5.w1.weight"),
    "a tensor missing in the model": (lambda k: k == "layers.1.feed_forward.experts.3.w2.weight", lambda k: False),
    "an expert missing on each side, not the same": (lambda k: ".2.feed_forward.experts.5." in k,
                                                    lambda k: ".2.block_sparse_moe.experts.3." in k),
    "a layer missing in the checkpoint": (lambda k: False, lambda k: k.startswith("model.layers.3.")),
}


@pytest.mark.parametrize("defect", list(_DEFECTS))
def test_unclean_folds_give_the_full_engines_answer(defect, monkeypatch):
    drop_model, drop_ckpt = _DEFECTS[defect]
    model = _without(_moe(4, 8, hf=False), drop_model)
    ckpt = _without(_moe(4, 8, hf=True), drop_ckpt)
    answered = []
    real = _diff._match_folded
    monkeypatch.setattr(_diff, "_match_folded", lambda *a: answered.append(real(*a)) or answered[-1])
    folded = _answer(model, ckpt, True, monkeypatch)
    assert folded == _answer(model, ckpt, False, monkeypatch)
    assert folded[1] or folded[2]
    # a hole inside the experts is answered on aligned folds; a whole layer missing leaves folds that cannot pair
    assert (answered[0] is not None) == (defect != "a layer missing in the checkpoint")


def test_aligned_folds_label_clusters_with_their_true_index_sets(monkeypatch):
    model = _moe(4, 8, hf=False)
    ckpt = _without(_moe(4, 8, hf=True), lambda k: k == "model.layers.2.block_sparse_moe.experts.5.w1.weight")
    monkeypatch.setattr(_diff, "FOLD_MIN_KEYS", 0)
    monkeypatch.setattr(_diff, "FOLD_MIN_SHARE", 0.0)
    folded = compare_keys(model, ckpt)
    monkeypatch.setattr(_diff, "FOLD_MIN_KEYS", 10**12)
    full = compare_keys(model, ckpt)
    assert [(e.source, e.target, e.evidence.cluster, e.evidence.note) for e in folded.mapping.entries] == [
        (e.source, e.target, e.evidence.cluster, e.evidence.note) for e in full.mapping.entries]
    w1 = next(e for e in folded.mapping.entries if e.target == "layers.0.feed_forward.experts.0.w1.weight")
    assert "experts.{0..7}.w1 (31 of 32)" in w1.evidence.cluster


@pytest.mark.parametrize("defect", list(_DEFECTS))
def test_folds_that_cannot_pair_are_refused_before_matching_and_nothing_else_is(defect, monkeypatch):
    """``can_pair`` is only a shortcut: wherever it refuses, the folded engine would have refused too."""
    drop_model, drop_ckpt = _DEFECTS[defect]
    model = _without(_moe(4, 8, hf=False), drop_model)
    ckpt = _without(_moe(4, 8, hf=True), drop_ckpt)
    monkeypatch.setattr(_diff, "FOLD_MIN_KEYS", 0)
    monkeypatch.setattr(_diff, "FOLD_MIN_SHARE", 0.0)
    rest_m, rest_c = list(model), list(ckpt)
    if not _fold.can_pair(fold_keys(rest_c, ckpt), fold_keys(rest_m, model)):
        monkeypatch.setattr(_diff, "can_pair", lambda *a: True)
        assert _diff._match_folded(ckpt, model, rest_c, rest_m, {k: k for k in ckpt}, {k: k for k in ckpt},
                                   0.5) is None


def test_a_hole_at_another_index_on_each_side_is_not_paired_across(monkeypatch):
    """Experts 0-4,6,7 against 0-2,4-7 in one layer, whole elsewhere: in order, 4 would go to 3; the other layers
    show that the numbers carry over, so equal numbers pair and expert 3 / expert 5 are reported."""
    drop_model, drop_ckpt = _DEFECTS["an expert missing on each side, not the same"]
    model = _without(_moe(4, 8, hf=False), drop_model)
    ckpt = _without(_moe(4, 8, hf=True), drop_ckpt)
    entries, missing, unused = _answer(model, ckpt, False, monkeypatch)
    for source, target, _ in entries:
        if ".experts." in target:
            assert source[0].split(".experts.")[1].split(".")[0] == target.split(".experts.")[1].split(".")[0]
    assert {k.split(".experts.")[1].split(".")[0] for k in missing} == {"3"}  # model keys with no source
    assert {k.split(".experts.")[1].split(".")[0] for k in unused} == {"5"}
