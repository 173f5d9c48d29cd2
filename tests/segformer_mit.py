"""The original SegFormer (NVlabs/SegFormer, an mmsegmentation fork), as research code: a test source for issue 11.

Written after NVlabs/SegFormer (commit 65fa8cf) ``mmseg/models/backbones/mix_transformer.py`` (``Attention`` with
``q`` and a fused ``kv``, ``Mlp`` with ``DWConv``, ``OverlapPatchEmbed``, ``MixVisionTransformer`` with
``patch_embed{1..4}``, ``block{1..4}``, ``norm{1..4}``) and ``mmseg/models/decode_heads/segformer_head.py``
(``SegFormerHead``: ``linear_c4`` .. ``linear_c1`` registered in that order, ``linear_fuse`` an mmcv ``ConvModule``
(convolution without bias, ``bn``, ReLU), ``linear_pred``; mmseg's ``BaseDecodeHead`` also builds ``conv_seg``,
which this head never calls but every checkpoint holds). mmcv and mmseg are not installable here: ``ConvModule``,
``resize`` and ``EncoderDecoder`` are reduced to what they compute at inference; the weight init is left out
(every tensor is randomised anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DWConv(nn.Module):
    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        x = self.dwconv(x.transpose(1, 2).view(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, sr_ratio: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = self.sr(x.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1)
            x = self.norm(x_)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_layer: type,
                 sr_ratio: int) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, H, W = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class MixVisionTransformer(nn.Module):
    def __init__(self, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 256, 512),
                 num_heads: Sequence[int] = (1, 2, 4, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 qkv_bias: bool = False, norm_layer: type = nn.LayerNorm, depths: Sequence[int] = (3, 4, 6, 3),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1)) -> None:
        super().__init__()
        self.depths = depths
        self.patch_embed1 = OverlapPatchEmbed(patch_size=7, stride=4, in_chans=in_chans, embed_dim=embed_dims[0])
        self.patch_embed2 = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=embed_dims[0], embed_dim=embed_dims[1])
        self.patch_embed3 = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=embed_dims[1], embed_dim=embed_dims[2])
        self.patch_embed4 = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=embed_dims[2], embed_dim=embed_dims[3])
        for s in range(4):  # block1, norm1, block2, norm2, ...: the original's registration order
            setattr(self, f"block{s + 1}", nn.ModuleList(
                Block(dim=embed_dims[s], num_heads=num_heads[s], mlp_ratio=mlp_ratios[s], qkv_bias=qkv_bias,
                      norm_layer=norm_layer, sr_ratio=sr_ratios[s]) for _ in range(depths[s])))
            setattr(self, f"norm{s + 1}", norm_layer(embed_dims[s]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        outs = []
        for s in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{s}")(x)
            for blk in getattr(self, f"block{s}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{s}")(x)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class MLP(nn.Module):
    """Linear Embedding."""

    def __init__(self, input_dim: int = 2048, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2))


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` with a BN norm and ReLU: ``conv`` (no bias, a norm follows), ``bn``, activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)  # SyncBN in training; the same tensors
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, embed_dim: int,
                 dropout_ratio: float = 0.1) -> None:
        super().__init__()
        # mmseg's BaseDecodeHead: conv_seg and dropout, built before the subclass's layers
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio)
        c1, c2, c3, c4 = in_channels
        self.linear_c4 = MLP(input_dim=c4, embed_dim=embed_dim)
        self.linear_c3 = MLP(input_dim=c3, embed_dim=embed_dim)
        self.linear_c2 = MLP(input_dim=c2, embed_dim=embed_dim)
        self.linear_c1 = MLP(input_dim=c1, embed_dim=embed_dim)
        self.linear_fuse = ConvModule(in_channels=embed_dim * 4, out_channels=embed_dim, kernel_size=1)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        c1, c2, c3, c4 = inputs
        n = c4.shape[0]
        size = c1.size()[2:]
        parts = []
        for c, linear in ((c4, self.linear_c4), (c3, self.linear_c3), (c2, self.linear_c2), (c1, self.linear_c1)):
            part = linear(c).permute(0, 2, 1).reshape(n, -1, c.shape[2], c.shape[3])
            parts.append(part if c is c1 else F.interpolate(part, size=size, mode="bilinear", align_corners=False))
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(parts, dim=1))))


class EncoderDecoder(nn.Module):
    """mmseg's ``EncoderDecoder`` at inference: the head's logits at 1/4 of the input (before the final resize)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(img))


# mit_b0 with segformer.b0's head at test size: four stages, spatial reduction 8/4/2/1, 5 classes
EMBED_DIMS, DEPTHS, HEADS = (8, 16, 24, 32), (1, 2, 1, 1), (1, 2, 3, 4)


def segformer_b0_tiny() -> nn.Module:
    from functools import partial

    backbone = MixVisionTransformer(embed_dims=EMBED_DIMS, num_heads=HEADS, mlp_ratios=(4, 4, 4, 4), qkv_bias=True,
                                    norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=DEPTHS, sr_ratios=(8, 4, 2, 1))
    head = SegFormerHead(in_channels=EMBED_DIMS, channels=8, num_classes=5, embed_dim=16)  # b0: 128 and 256
    return EncoderDecoder(backbone, head)
