"""Templating keys into units and clusters."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keydiff._keys import KeySet, TensorInfo, format_indices, natural_key
from keydiff._patterns import build_clusters, build_units, fill_template, name_tokens, structural_order, template_of


def _ks(keys: list[str], shape: tuple[int, ...] = (4,)) -> KeySet:
    return KeySet.from_items((k, TensorInfo(shape, "float32")) for k in keys)


def test_indices_are_found_in_whole_tokens_and_inside_tokens():
    assert template_of("blocks.3.attn.qkv") == ("blocks.{}.attn.qkv", (3,))
    assert template_of("encoder.layers.encoder_layer_11.ln_1") == ("encoder.layers.encoder_layer_{}.ln_1", (11,))
    assert template_of("layer4.2.conv1") == ("layer{}.{}.conv1", (4, 2))
    assert template_of("stages.1.block1-0.conv") == ("stages.{}.block{}-{}.conv", (1, 1, 0))


def test_numbered_part_names_are_not_indices():
    assert template_of("blocks.0.norm1") == ("blocks.{}.norm1", (0,))
    assert template_of("mlp.fc2") == ("mlp.fc2", ())


def test_inner_index_with_fixed_values_and_different_tensors_is_a_part_name():
    items = [(f"layers.{i}.mlp.{j}.weight", TensorInfo((8, 4) if j == 0 else (4, 8), "float32"))
             for i in range(3) for j in (0, 3)]
    keys = KeySet.from_items(items)
    clusters = build_clusters(build_units(keys, keys))
    assert [c.label for c in clusters] == ["layers.{0..2}.mlp.0", "layers.{0..2}.mlp.3"]


def test_inner_index_over_identical_tensors_is_a_repeat():
    keys = [f"layers.{i}.experts.{e}.w1.weight" for i in range(2) for e in range(4)]
    (cluster,) = build_clusters(build_units(_ks(keys), keys))
    assert cluster.label == "layers.{0,1}.experts.{0..3}.w1"


def test_ragged_index_sets_are_not_shown_as_a_product():
    keys = [f"stages.{s}.blocks.{b}.weight" for s, depth in enumerate([1, 1, 3, 1]) for b in range(depth)]
    (cluster,) = build_clusters(build_units(_ks(keys), keys))
    assert cluster.label == "stages.{0..3}.blocks.{0..2} (6 of 12)"


def test_unit_groups_a_modules_tensors_and_bare_parameters_stand_alone():
    keys = ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.ls1", "cls_token",
            "attn.in_proj_weight", "attn.in_proj_bias"]
    units = {u.path: [leaf.name for leaf in u.leaves] for u in build_units(_ks(keys), keys)}
    assert units == {"blocks.0.attn.qkv": ["bias", "weight"], "blocks.0.ls1": ["weight"], "cls_token": ["weight"],
                     "attn.in_proj": ["bias", "weight"]}


def test_structural_order_puts_own_parameters_before_children():
    keys = ["f.1.0.block.0.weight", "f.1.0.layer_scale", "f.10.w", "f.2.w", "a"]
    assert structural_order(keys) == ["a", "f.1.0.layer_scale", "f.1.0.block.0.weight", "f.2.w", "f.10.w"]


def test_name_tokens_are_canonical_and_skip_location_words():
    assert name_tokens("encoder.layers.{}.layernorm_before") == ("block", "norm1")
    assert name_tokens("transformer.resblocks.{}.mlp.c_proj") == ("block", "mlp", "fc2")
    assert name_tokens("blocks.{}.attn.proj") == ("block", "attn", "out")


@given(st.lists(st.integers(0, 200), min_size=1, max_size=40))
def test_format_indices_is_exact(values):
    text = format_indices(values)
    if len(set(values)) == 1:
        assert text == str(values[0])
        return
    got: set[int] = set()
    for part in text.strip("{}").split(","):
        lo, _, hi = part.partition("..")
        got.update(range(int(lo), int(hi or lo) + 1))
    assert got == set(values)


@given(st.lists(st.tuples(st.sampled_from(["blocks", "layers", "stage"]), st.integers(0, 30),
                          st.sampled_from(["attn.qkv", "mlp.fc1", "norm"])), min_size=1, max_size=30))
def test_templating_round_trips(parts):
    """Filling a template with its own indices gives back the key; templating is idempotent."""
    for head, i, tail in parts:
        key = f"{head}.{i}.{tail}"
        tpl, ix = template_of(key)
        assert tpl.replace("{}", "{!s}").format(*ix) == key
        assert template_of(tpl.replace("{}", "{!s}").format(*ix)) == (tpl, ix)
        assert fill_template(tpl, [ix]) == key


def test_natural_key_orders_numbers_by_value():
    assert sorted(["b.10", "b.9", "b.1"], key=natural_key) == ["b.1", "b.9", "b.10"]


_TOKENS = st.sampled_from(["blocks", "layer", "layers", "0", "3", "10", "007", "layer1", "layer12", "block1-0",
                           "stages_2", "fc2", "w1", "conv2d_1a", "x", "mlp", "weight", "bias", "a٣", "٣", "b0b",
                           "encoder_layer_11", "res-3", "_", "-1"])
_KEYS = st.lists(_TOKENS, min_size=1, max_size=6).map(".".join)


@given(_KEYS)
def test_template_per_skeleton_equals_the_token_by_token_reading(key):
    """The fast templater (index runs decided once per text skeleton) gives what reading each token gives."""
    from keydiff._patterns import _parse_template, _template_by_token

    assert _parse_template(key) == _template_by_token(key)


def _reference_structural_order(keys: list[str]) -> list[str]:
    def sort_key(key: str) -> tuple:
        tokens = key.split(".")
        return tuple((i < len(tokens) - 1, natural_key(t)) for i, t in enumerate(tokens))

    return sorted(keys, key=sort_key)


@given(st.lists(_KEYS, max_size=40, unique=True))
def test_structural_order_equals_the_token_tuple_order(keys):
    """The one-string sort key orders keys as comparing (is a child, natural key) per token does."""
    assert structural_order(keys) == _reference_structural_order(keys)


def test_mapping_is_the_same_under_any_hash_seed(tmp_path):
    """Keys whose numbers tie in the natural order (``07`` and ``7``) keep the key set's order, not a set's."""
    import os
    import subprocess
    import sys

    path = tmp_path / "ck.safetensors"  # a safetensors file: its key order is no evidence, the structure decides
    script = (
        "import sys, keydiff, torch\n"
        "from safetensors.torch import save_file\n"
        "names = [f'blocks.{i}.w' for i in ('07', '7', '8', '08', '9', '10')]\n"
        "save_file({n.replace('blocks', 'layers'): torch.zeros(2) for n in names}, sys.argv[1])\n"
        "print(keydiff.diff({n: torch.zeros(2) for n in names}, sys.argv[1]).mapping.dumps())\n"
    )
    outs = {subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3", "4")}
    assert len(outs) == 1


@given(st.lists(st.sampled_from(["module.a", "a", "module.b", "b", "model.a", "x.module.a"]), max_size=12),
       st.sampled_from(["", "module.", "model."]), st.sampled_from(["", "model.", "m."]))
def test_prefix_count_is_apply_over_every_key(keys, strip, add):
    from keydiff._normalize import Prefix

    model = {"a", "b", "model.a", "m.b"}
    prefix = Prefix(strip=strip, add=add)
    assert prefix.count(keys, model) == sum(prefix.apply(k) in model for k in keys)


_TOKENS = st.sampled_from(["blocks", "layer1", "0", "3", "12", "07", "mlp", "fc2", "block1-0", "encoder_layer_4",
                           "experts", "w1", "norm", "stage2", "x9y", "é1", "٣", "attn", "qkv"])
_LEAVES = st.sampled_from(["weight", "bias", "running_mean", "in_proj_weight", "scale", "w2", "gamma"])


@given(keys=st.lists(st.builds(lambda ts, leaf: ".".join([*ts, leaf]), st.lists(_TOKENS, min_size=1, max_size=5),
                               _LEAVES), min_size=1, max_size=30, unique=True))
def test_key_templates_remembered_by_build_units_are_the_parsed_ones(keys):
    """build_units records its keys' templates from their paths' without parsing: the same answer as parsing."""
    from keydiff import _patterns

    _patterns._TEMPLATES.clear()
    build_units(_ks(keys), keys)
    for key in keys:
        if key in _patterns._TEMPLATES:
            assert _patterns._TEMPLATES[key] == _patterns._parse_template(key), key


@given(path=st.lists(_TOKENS, min_size=1, max_size=6).map(".".join))
def test_template_parse_by_skeleton_agrees_with_token_by_token(path):
    from keydiff import _patterns

    assert _patterns._parse_template(path) == _patterns._template_by_token(path)
