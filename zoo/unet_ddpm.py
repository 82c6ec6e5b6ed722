"""The Kronecker paper's U-Net: a DDPM-style U-Net (its dense `UNet` and its Kronecker `PHUNet`).

Built as the paper's official configuration builds it (Whethe/HyperKron-MRI-Recon:
`models/network/network_unet_v2.py`, `network_hyperunet.py`, `options/HyperUnet/train_hyperunet_*.json`:
model_channels 64, channel_mult 1,2,4,8, num_res_blocks 2, attention_resolutions [], dropout 0), written anew:

- head: 3×3 conv 2 → ch;
- down path: one level per channel multiplier, `num_res_blocks` residual blocks each, a stride-2 3×3
  conv between levels;
- middle: a residual block followed by single-head self-attention, then a plain residual block;
- up path: `num_res_blocks + 1` residual blocks per level, each on the concatenation of the current
  features and one stored skip, nearest ×2 upsampling + 3×3 conv between levels;
- tail: GroupNorm–SiLU–3×3 conv ch → 2. There is no residual connection to the input image.

A residual block is GroupNorm–SiLU–3×3 conv, plus a per-channel bias from the embedding, then
GroupNorm–SiLU–dropout–3×3 conv, plus the input (through a 1×1 conv when the width changes).

**The embedding (t = 0).** The official network is a diffusion U-Net whose forward always receives the
constant timestep t = 0. We keep exactly that computation: the sinusoidal embedding of step 0 is a fixed
buffer, followed by the trained MLP (Linear ch → 4ch, SiLU, Linear 4ch → 4ch) and, in every block, a trained
SiLU–Linear(4ch → width) projection. Its result does not depend on the input, so it acts as a learned
per-channel bias, but the parameters are those of the official model. The official code keeps a frozen
1000 × ch sinusoid table (`nn.Embedding.from_pretrained`) of which only row 0 is ever read; it is not trained,
and we store only that row (so our parameter count leaves out its T·ch = 64,000 frozen entries).

Initialisation follows the dense official code: Xavier-uniform weights, zero biases, gain 1e-5 on the last
conv of every residual block, on the attention's output projection and on the tail conv (so each block starts
near the identity and the network's output near zero).

H and W are reflect-padded to a multiple of 2^(levels − 1) (one halving per level boundary) and cropped
back, so any size works.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.padding import crop_to, pad_to_multiple

# The Kronecker version (`kron_unet_ddpm*`), as the official PHUNet: every convolution (head, residual-block
# convs and 1×1 shortcuts, down/upsampling convs, tail) becomes Kronecker; the attention's 1×1 q/k/v/output
# projections and the embedding's Linear layers (the time MLP and every block's projection) stay dense.
KRON_SETTINGS: dict = dict(
    n=2,
    exclude=[r"re:.*\.attn\.proj_(q|k|v|out)", r"re:(time_embedding\..*|.*\.temb_proj\..*)"],
    overrides=None,
)

# Trainable parameters of the official configuration (`unet_ddpm()`, 2 channels), dense and as
# `kron_unet_ddpm` at n = 2 (`kronify.kron_param_count` per converted layer). tests/zoo/test_zoo_unet_ddpm.py
# derives both from the architecture's formula.
PARAMS_DENSE = 56_573_442
PARAMS_KRON_N2 = 29_625_242


def _step_embedding(dim: int, step: int = 0) -> torch.Tensor:
    """The DDPM sinusoidal embedding of one timestep (sin/cos pairs interleaved), shape (dim,)."""
    if dim % 2:
        raise ValueError(f"embedding width {dim} must be even")
    freqs = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float64) / dim * math.log(10000.0))
    angles = step * freqs
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(dim).float()


def _xavier(conv: nn.Module, gain: float = 1.0) -> None:
    nn.init.xavier_uniform_(conv.weight, gain=gain)
    nn.init.zeros_(conv.bias)


class TimeEmbedding(nn.Module):
    """The embedding of the constant timestep t = 0: fixed sinusoid → Linear → SiLU → Linear, shape (temb_dim,)."""

    def __init__(self, dim: int, temb_dim: int):
        super().__init__()
        self.register_buffer("zero_step", _step_embedding(dim, step=0), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        for m in (self.mlp[0], self.mlp[2]):
            _xavier(m)

    def forward(self) -> torch.Tensor:
        return self.mlp(self.zero_step)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels: GroupNorm, 1×1 conv q/k/v, softmax(qkᵀ/√C)v, 1×1 conv, + input."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.proj_q, self.proj_k, self.proj_v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        for m in (self.proj_q, self.proj_k, self.proj_v):
            _xavier(m)
        _xavier(self.proj_out, gain=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.proj_q, self.proj_k, self.proj_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H·W, C), scale 1/√C
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """GroupNorm–SiLU–3×3 conv, + per-channel embedding bias, GroupNorm–SiLU–dropout–3×3 conv, + shortcut;
    then self-attention when `attn`."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, norm_groups: int,
                 attn: bool = False):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(norm_groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, 1, 1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, out_ch))
        self.block2 = nn.Sequential(nn.GroupNorm(norm_groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(out_ch, out_ch, 3, 1, 1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch, norm_groups) if attn else nn.Identity()
        for m in (self.block1[-1], self.temb_proj[-1], self.shortcut):
            if not isinstance(m, nn.Identity):
                _xavier(m)
        _xavier(self.block2[-1], gain=1e-5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb_proj(temb)[..., None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class Downsample(nn.Module):
    """Stride-2 3×3 conv (halves H and W, keeps the width)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 1)
        _xavier(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 upsampling, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        _xavier(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class DDPMUNet(nn.Module):
    """(B, in_chans, H, W) -> (B, out_chans, H, W), any H×W; see the module docstring for the structure."""

    needs_kspace = False

    def __init__(self, in_chans: int = 2, out_chans: int = 2, ch: int = 64, ch_mult: Sequence[int] = (1, 2, 4, 8),
                 num_res_blocks: int = 2, attn_levels: Sequence[int] = (), dropout: float = 0.0,
                 norm_groups: int = 32, pad_mode: str = "reflect"):
        super().__init__()
        ch_mult, attn_levels = tuple(ch_mult), tuple(attn_levels)
        if not ch_mult or num_res_blocks < 1:
            raise ValueError(f"need at least one level and one residual block, got ch_mult={ch_mult}, "
                             f"num_res_blocks={num_res_blocks}")
        bad_levels = [i for i in attn_levels if not 0 <= i < len(ch_mult)]
        if bad_levels:
            raise ValueError(f"attn_levels {bad_levels} out of range for {len(ch_mult)} levels")
        widths = sorted({ch} | {ch * m for m in ch_mult})
        undivided = [w for w in widths if w % norm_groups]
        if undivided:
            raise ValueError(f"GroupNorm with norm_groups={norm_groups} needs every width divisible by it; "
                             f"widths {undivided} are not (ch={ch}, ch_mult={ch_mult})")
        self.in_chans, self.out_chans, self.pad_mode = in_chans, out_chans, pad_mode
        self.multiple = 2 ** (len(ch_mult) - 1)
        temb_dim = 4 * ch
        self.time_embedding = TimeEmbedding(ch, temb_dim)
        self.head = nn.Conv2d(in_chans, ch, 3, 1, 1)
        _xavier(self.head)

        block = lambda cin, cout, attn: ResBlock(cin, cout, temb_dim, dropout, norm_groups, attn)  # noqa: E731
        skips, now = [ch], ch
        self.downblocks = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(block(now, ch * mult, level in attn_levels))
                now = ch * mult
                skips.append(now)
            if level != len(ch_mult) - 1:
                self.downblocks.append(Downsample(now))
                skips.append(now)
        self.middleblocks = nn.ModuleList([block(now, now, True), block(now, now, False)])
        self.upblocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(block(now + skips.pop(), ch * ch_mult[level], level in attn_levels))
                now = ch * ch_mult[level]
            if level != 0:
                self.upblocks.append(Upsample(now))
        self.tail = nn.Sequential(nn.GroupNorm(norm_groups, now), nn.SiLU(), nn.Conv2d(now, out_chans, 3, 1, 1))
        _xavier(self.tail[-1], gain=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, self.multiple, self.pad_mode)
        temb = self.time_embedding().to(padded.dtype).expand(padded.shape[0], -1)
        h = self.head(padded)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(h)
        return crop_to(self.tail(h), size)


def unet_ddpm(in_chans: int = 2, **kwargs) -> DDPMUNet:
    """The paper's U-Net as its official configuration builds it: ch 64, multipliers 1,2,4,8, two residual
    blocks per level, attention only in the middle, dropout 0, GroupNorm(32). Its parameter counts, dense and
    Kronecker at n = 2, are `PARAMS_DENSE` and `PARAMS_KRON_N2`."""
    cfg = dict(ch=64, ch_mult=(1, 2, 4, 8), num_res_blocks=2, attn_levels=(), dropout=0.0, norm_groups=32)
    return DDPMUNet(in_chans=in_chans, out_chans=in_chans, **{**cfg, **kwargs})


def unet_ddpm_demo(in_chans: int = 2, **kwargs) -> DDPMUNet:
    """The same structure, narrow for CPU demos: ch 8 (widths 8–64), GroupNorm(4)."""
    return unet_ddpm(in_chans, **{**dict(ch=8, norm_groups=4), **kwargs})


def unet_ddpm_tiny(in_chans: int = 2, **kwargs) -> DDPMUNet:
    """The same structure, tiny for tests: ch 4 (widths 4–32), one residual block per level, GroupNorm(2)."""
    return unet_ddpm(in_chans, **{**dict(ch=4, num_res_blocks=1, norm_groups=2), **kwargs})
