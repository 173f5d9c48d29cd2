"""Write ``tour.ipynb`` from the cells below, without outputs, so the committed notebook is reproducible.

    python notebooks/make_tour.py          # rewrite notebooks/tour.ipynb
    python notebooks/make_tour.py --check  # exit 1 if the committed notebook differs (tests/test_notebook.py)

Cell ids are fixed, so the JSON only changes when a cell does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PATH = Path(__file__).with_name("tour.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """# A tour of keydiff

A Hugging Face ViT checkpoint does not load into timm's ViT: every name differs and timm fuses q, k and v into one
`qkv` tensor. This notebook makes such a checkpoint (tiny, random, nothing downloaded), then walks through what
keydiff tells about it: the diff, its clusters, the proposed mapping, the converted weights, tensor statistics,
value differences between checkpoints, a shareable report and a generated `checkpoint_filter_fn`."""),
    ("code", """import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel

import keydiff

torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="keydiff-tour-"))

# The source: a transformers ViT, 6 blocks of width 64. Every tensor gets distinct random values, standing in for
# pretrained weights (a fresh init would leave the biases at zero).
source = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                            image_size=32, patch_size=8, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
with torch.no_grad():
    for name, p in source.named_parameters():
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm_before.weight") else 0.0))
hf_path = work / "hf_vit.safetensors"
save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(hf_path))

# The target: timm's ViT of the same size.
VIT = dict(embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, img_size=32, patch_size=8, num_classes=0)
len(load_file(str(hf_path))), len(timm.create_model("vit_base_patch16_224", **VIT).state_dict())"""),
    ("md", """## 1. The diff

`keydiff.diff(model, checkpoint)` reads the checkpoint's header (no tensor data) and the model built on the meta
device, and returns a `Diff`. Displayed, it is the same report as `keydiff vit_base_patch16_224 hf_vit.safetensors`
prints: the verdict, the causes, the mapping cluster by cluster, the leftovers."""),
    ("code", """d = keydiff.diff("vit_base_patch16_224", hf_path, **VIT)
d"""),
    ("md", """## 2. Clusters

Keys group into clusters (`layers.{0..5}.attention.q_proj`): the unit every report shows. `d.clusters.to_frame()`
lists the clusters of both sides, with what each became."""),
    ("code", """d.clusters.to_frame().head(12)"""),
    ("md", """## 3. The proposed mapping

`d.mapping` is a `KeyMap` value: one entry per model key with its op (rename, reshape, transpose, concat, split),
confidence and evidence, plus the compressed regex rules and the leftovers. It applies itself, inverts itself and
round-trips through JSON."""),
    ("code", """d.mapping.to_frame().query("op != 'rename'")"""),
    ("code", """[(r.pattern, r.replace) for r in d.mapping.rules][:5]"""),
    ("md", """## 4. Applying it

`d.apply()` reads the tensors one at a time and returns the converted state dict. It loads with `strict=True`, and
the converted model computes what the source computed."""),
    ("code", """model = timm.create_model("vit_base_patch16_224", **VIT).eval()
model.load_state_dict(d.apply(), strict=True)
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    err = (model.forward_features(x) - source(pixel_values=x).last_hidden_state).abs().max().item()
print(f"max abs difference of the output tokens: {err:.1e}")
converted = work / "timm_vit.safetensors"
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(converted))"""),
    ("md", """## 5. Inspecting tensors

`d.tensor(key)` loads one checkpoint tensor lazily. `d.stats()` (or `keydiff.stats(path)`, or
`keydiff stats CKPT`) computes per-tensor statistics one tensor at a time, accumulating in float64 over bounded
chunks: shape, dtype, mean, std, min, max, abs max, zero fraction, NaN and Inf counts, and a flag."""),
    ("code", """d.tensor("embeddings.cls_token").shape"""),
    ("code", """d.stats().head()"""),
    ("md", """A checkpoint with a NaN, an Inf and an all-zero tensor: the `flag` column names them (and `keydiff stats`
lists them first and exits 1 on NaN or Inf)."""),
    ("code", """broken = load_file(str(hf_path))
broken["layers.3.mlp.fc2.weight"][0, :4] = float("nan")
broken["layers.5.attention.v_proj.bias"][7] = float("inf")
broken["layernorm.bias"].zero_()
save_file(broken, str(work / "broken.safetensors"))
stats = keydiff.stats(work / "broken.safetensors")
stats[stats.flag != ""][["key", "shape", "nan", "inf", "zero_frac", "flag"]]"""),
    ("md", """## 6. Value differences

`keydiff.compare(a, b)` matches B's tensors to A's through the proposed mapping (names may differ: here B is the
Hugging Face file and A the converted timm one), then compares every pair: max abs diff, relative L2 change, cosine
similarity, and whether the bytes are identical. A conversion that kept every value says so."""),
    ("code", """keydiff.compare(converted, hf_path)"""),
    ("md", """Now a real, if short, fine-tuning run: a few AdamW steps on random data with layer-wise learning-rate
decay (the deeper the block, the larger its learning rate), as ViTs are usually fine-tuned. The value diff shows what
changed, cluster by cluster, most changed first."""),
    ("code", """tuned = timm.create_model("vit_base_patch16_224", **VIT)
tuned.load_state_dict(load_file(str(converted)), strict=True)
head = torch.nn.Linear(64, 10)
groups = [{"params": head.parameters(), "lr": 1e-3}, {"params": tuned.norm.parameters(), "lr": 1e-3}]
groups += [{"params": block.parameters(), "lr": 1e-3 * 0.5 ** (5 - i)} for i, block in enumerate(tuned.blocks)]
groups += [{"params": [tuned.cls_token, tuned.pos_embed, *tuned.patch_embed.parameters()], "lr": 1e-3 * 0.5**6}]
optimizer = torch.optim.AdamW(groups)
images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
for _ in range(10):
    loss = torch.nn.functional.cross_entropy(head(tuned.forward_head(tuned.forward_features(images))), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
finetuned = work / "finetuned.safetensors"
save_file({k: v.detach().contiguous() for k, v in tuned.state_dict().items()}, str(finetuned))

vd = keydiff.compare(converted, finetuned)
vd"""),
    ("code", """vd.by_cluster().head(8)"""),
    ("md", """Per layer, a picture reads better than a table: the relative change of each weight across the blocks (a
`vd.to_frame()` column per cluster, indexed by block)."""),
    ("code", """import importlib.util

frame = vd.to_frame()
per_layer = frame[frame.key.str.endswith(".weight")].pivot_table(index="layer", columns="cluster",
                                                                  values="rel_change")
if importlib.util.find_spec("matplotlib"):
    ax = per_layer.plot(marker="o", logy=True, figsize=(8, 4), title="relative change per block")
    ax.set_xlabel("block")
    ax.set_ylabel("||after - before|| / ||before||")
else:
    print(per_layer)"""),
    ("md", """## 7. A report to share

`d.to_markdown()` is the same report as GitHub-flavoured markdown, compact enough to paste into an issue;
`d.to_html()` is one standalone page (no network assets). From the command line: `--report report.md` or
`--report report.html`."""),
    ("code", """from IPython.display import Markdown

(work / "report.html").write_text(d.to_html())
Markdown(d.to_markdown())"""),
    ("md", """## 8. Generated code

`d.to_python()` (or `--emit-python filter.py`) writes the mapping as a self-contained
`checkpoint_filter_fn(state_dict, model=None)` in timm's style: anchored regex rules, per-key tables for what the
rules do not cover, and the ops. It needs only torch, so the dependency on keydiff can go."""),
    ("code", """code = d.to_python()
print(code[code.index("RULES"):code.index("def checkpoint_filter_fn")])"""),
    ("code", """namespace = {}
exec(code, namespace)
state_dict = namespace["checkpoint_filter_fn"](load_file(str(hf_path)))
fresh = timm.create_model("vit_base_patch16_224", **VIT)
fresh.load_state_dict(state_dict, strict=True)"""),
    ("md", """## From the command line

```
keydiff vit_base_patch16_224 hf_vit.safetensors -m embed_dim=64 -m depth=6 ... -o timm_vit.safetensors \\
    --report report.md --emit-python filter.py
keydiff timm_vit.safetensors finetuned.safetensors --values
keydiff stats broken.safetensors --csv stats.csv
```"""),
    ("code", """import shutil

shutil.rmtree(work)"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    cells = []
    for i, (kind, source) in enumerate(CELLS):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"tour-{i:02d}"
        cells.append(cell)
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return nb


def main(argv: list[str]) -> int:
    text = nbformat.writes(build()) + "\n"
    if "--check" in argv:
        same = PATH.exists() and PATH.read_text(encoding="utf-8") == text
        print("tour.ipynb is up to date" if same else "tour.ipynb differs: run python notebooks/make_tour.py")
        return 0 if same else 1
    PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
