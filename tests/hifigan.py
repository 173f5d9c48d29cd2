"""The original HiFi-GAN generator, as research code: a test source for issue 11.

Written after jik876/hifi-gan (commit 4769534) ``models.py`` (``ResBlock1``, ``ResBlock2``, ``Generator``) and
``utils.py`` (``init_weights``, ``get_padding``). Training saves ``{'generator': generator.state_dict()}`` with
``torch.save`` to ``g_NNNNNNNN`` (no suffix), every convolution weight-normalised (``weight_g``/``weight_v``);
inference and export call ``remove_weight_norm()`` first, leaving plain ``weight``. Left out: the discriminators.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Conv1d, ConvTranspose1d
from torch.nn.utils import remove_weight_norm, weight_norm

LRELU_SLOPE = 0.1


def init_weights(m: nn.Module, mean: float = 0.0, std: float = 0.01) -> None:
    if m.__class__.__name__.find("Conv") != -1:
        m.weight.data.normal_(mean, std)


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return int((kernel_size * dilation - dilation) / 2)


class ResBlock1(nn.Module):
    def __init__(self, h: SimpleNamespace, channels: int, kernel_size: int = 3, dilation: tuple = (1, 3, 5)) -> None:
        super().__init__()
        self.h = h
        self.convs1 = nn.ModuleList([
            weight_norm(Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d)))
            for d in dilation[:3]])
        self.convs1.apply(init_weights)
        self.convs2 = nn.ModuleList([
            weight_norm(Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=get_padding(kernel_size, 1)))
            for _ in range(3)])
        self.convs2.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            xt = c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
            x = xt + x
        return x

    def remove_weight_norm(self) -> None:
        for layer in [*self.convs1, *self.convs2]:
            remove_weight_norm(layer)


class ResBlock2(nn.Module):
    def __init__(self, h: SimpleNamespace, channels: int, kernel_size: int = 3, dilation: tuple = (1, 3)) -> None:
        super().__init__()
        self.h = h
        self.convs = nn.ModuleList([
            weight_norm(Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d)))
            for d in dilation[:2]])
        self.convs.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = c(F.leaky_relu(x, LRELU_SLOPE)) + x
        return x

    def remove_weight_norm(self) -> None:
        for layer in self.convs:
            remove_weight_norm(layer)


class Generator(nn.Module):
    def __init__(self, h: SimpleNamespace) -> None:
        super().__init__()
        self.h = h
        self.num_kernels = len(h.resblock_kernel_sizes)
        self.num_upsamples = len(h.upsample_rates)
        self.conv_pre = weight_norm(Conv1d(80, h.upsample_initial_channel, 7, 1, padding=3))
        resblock = ResBlock1 if h.resblock == "1" else ResBlock2
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(h.upsample_rates, h.upsample_kernel_sizes, strict=True)):
            self.ups.append(weight_norm(ConvTranspose1d(h.upsample_initial_channel // (2 ** i),
                                                        h.upsample_initial_channel // (2 ** (i + 1)),
                                                        k, u, padding=(k - u) // 2)))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = h.upsample_initial_channel // (2 ** (i + 1))
            for k, d in zip(h.resblock_kernel_sizes, h.resblock_dilation_sizes, strict=True):
                self.resblocks.append(resblock(h, ch, k, d))
        self.conv_post = weight_norm(Conv1d(ch, 1, 7, 1, padding=3))
        self.ups.apply(init_weights)
        self.conv_post.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(x)
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, LRELU_SLOPE))
            xs = None
            for j in range(self.num_kernels):
                r = self.resblocks[i * self.num_kernels + j](x)
                xs = r if xs is None else xs + r
            x = xs / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

    def remove_weight_norm(self) -> None:
        for layer in self.ups:
            remove_weight_norm(layer)
        for block in self.resblocks:
            block.remove_weight_norm()
        remove_weight_norm(self.conv_pre)
        remove_weight_norm(self.conv_post)


# config_v1.json at test size: the same structure (four upsamplings, three kernel sizes, ResBlock1), narrow
CONFIG = SimpleNamespace(resblock="1", upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                         upsample_initial_channel=16, resblock_kernel_sizes=[3, 5, 7],
                         resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]])


def training_generator() -> nn.Module:
    """The generator as training holds it: every convolution weight-normalised."""
    return Generator(CONFIG)


def inference_generator() -> nn.Module:
    """The generator as inference and export use it: ``remove_weight_norm()`` called, plain weights."""
    g = Generator(CONFIG)
    g.remove_weight_norm()
    return g
