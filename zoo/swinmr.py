"""SwinMR (Huang et al., Neurocomputing 2022): the SwinIR-style Swin transformer for MRI reconstruction.

Structure (as in the public SwinMR code, ayanglab/SwinMR models/network_swinmr.py, written anew here):
3×3 conv stem → tokens + LayerNorm → residual Swin transformer blocks (RSTB: `depth` Swin layers that
alternate plain and shifted windows, then a 3×3 conv, plus the block input) → LayerNorm → 3×3 conv plus
the stem output (long skip) → 3×3 output conv, added to the input image. H and W are reflect-padded to
a multiple of the window size and cropped back, so any size works.

Attention runs through `F.scaled_dot_product_attention`, with the relative position bias (timm's
`RelPosBias`) plus, for shifted windows, the mask that stops tokens that the cyclic shift brought
together from attending to each other, passed as `attn_mask`. qkv, proj, fc1 and fc2 are plain
`nn.Linear`, so `kronify.convert` reaches them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, RelPosBias, trunc_normal_
from timm.models.swin_transformer import window_partition, window_reverse

from zoo.padding import crop_to, pad_to_multiple

# The Kronecker version (`kron_swinmr*`): every Linear (qkv, proj, fc1, fc2) and Conv2d at n = 2.
# Nothing is excluded by name; a 1-channel build's stem and output convs (1 channel) do not divide
# by 2 and are left dense by `convert`, which records why.
KRON_SETTINGS: dict = dict(n=2, exclude=None, overrides=None)


def shifted_window_mask(height: int, width: int, window: int, shift: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """Additive attention mask (num_windows, window², window²) for shifted windows: 0 where two tokens
    of a window were neighbours before the cyclic shift, -inf where the shift wrapped them together."""
    labels = torch.zeros(height, width, device=device)
    bands = ((0, -window), (-window, -shift), (-shift, None))
    region = 0
    for h0, h1 in bands:
        for w0, w1 in bands:
            labels[h0:h1, w0:w1] = region
            region += 1
    windows = window_partition(labels[None, :, :, None], (window, window)).reshape(-1, window * window)
    same = windows[:, None, :] == windows[:, :, None]
    return torch.zeros(same.shape, device=device).masked_fill(~same, float("-inf"))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows, with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rel_pos = RelPosBias((window_size, window_size), num_heads)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, num_windows, N, C) window tokens; mask: (num_windows, N, N) additive, or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, head_dim)
        bias = self.rel_pos.get_bias().to(q.dtype)  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask.to(q.dtype).unsqueeze(1)  # (nW, heads, N, N), broadcast over B
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SwinLayer(nn.Module):
    """One Swin transformer layer: LayerNorm → (shifted) window attention → residual; LayerNorm → MLP → residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self._masks: dict = {}  # (H, W, device) -> shift mask; a cache, not state

    def shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """The shifted-window mask for an H×W token grid (cached per size and device), or None if unshifted."""
        if self.shift_size == 0:
            return None
        key = (height, width, str(device))
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(height, width, self.window_size, self.shift_size, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """x: (B, H*W, C) tokens of an H×W grid with H, W multiples of the window size."""
        h, w = size
        b, _, c = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(y, (ws, ws)).view(b, -1, ws * ws, c)
        windows = self.attn(windows, self.shift_mask(h, w, x.device))
        y = window_reverse(windows.view(-1, ws, ws, c), (ws, ws), h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RSTB(nn.Module):
    """Residual Swin transformer block: `depth` Swin layers (plain, shifted, plain, …), a 3×3 conv, + input."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] | float = 0.0):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        self.layers = nn.ModuleList(
            SwinLayer(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio,
                      qkv_bias, drop, attn_drop, rates[i])
            for i in range(depth))
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(y, size)
        b, _, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *size))
        return y.flatten(2).transpose(1, 2) + x


class SwinMR(nn.Module):
    """SwinMR for image-domain reconstruction: (B, in_chans, H, W) -> (B, in_chans, H, W), any H×W."""

    needs_kspace = False

    def __init__(self, in_chans: int = 2, embed_dim: int = 180, depths: Sequence[int] = (6,) * 6,
                 num_heads: Sequence[int] = (6,) * 6, window_size: int = 8, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, pad_mode: str = "reflect"):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        self.in_chans, self.window_size, self.pad_mode = in_chans, window_size, pad_mode
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            RSTB(embed_dim, d, h, window_size, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[s:s + d])
            for d, h, s in zip(depths, num_heads, starts))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features: tokens through every RSTB, then LayerNorm; (B, C, H, W) in and out."""
        b, c, h, w = x.shape
        t = self.pos_drop(self.patch_norm(x.flatten(2).transpose(1, 2)))
        for layer in self.layers:
            t = layer(t, (h, w))
        return self.norm(t).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, self.window_size, self.pad_mode)
        first = self.conv_first(padded)
        res = self.conv_after_body(self.forward_features(first)) + first
        return crop_to(padded + self.conv_last(res), size)


def swinmr(in_chans: int = 2, **kwargs) -> SwinMR:
    """The published SwinMR: embed_dim 180, depths 6×6, heads 6×6, window 8, mlp_ratio 2
    (11.50 M parameters at in_chans=1; the zoo default is 2 channels, real and imaginary)."""
    cfg = dict(embed_dim=180, depths=(6,) * 6, num_heads=(6,) * 6, window_size=8, mlp_ratio=2.0)
    return SwinMR(in_chans=in_chans, **{**cfg, **kwargs})


def swinmr_paper(in_chans: int = 2, **kwargs) -> SwinMR:
    """SwinMR as the Kronecker paper's code configures it: embed_dim 120, depths 6×6, heads 6×6
    (its options file), window 8, mlp_ratio 2, 2 channels."""
    cfg = dict(embed_dim=120, depths=(6,) * 6, num_heads=(6,) * 6, window_size=8, mlp_ratio=2.0)
    return SwinMR(in_chans=in_chans, **{**cfg, **kwargs})


def swinmr_demo(in_chans: int = 2, **kwargs) -> SwinMR:
    """A tiny SwinMR for CPU demos and tests: embed_dim 24, two RSTBs of 2 layers, 2 heads, window 8."""
    cfg = dict(embed_dim=24, depths=(2, 2), num_heads=(2, 2), window_size=8, mlp_ratio=2.0,
               drop_path_rate=0.0)
    return SwinMR(in_chans=in_chans, **{**cfg, **kwargs})
