"""LB-UNet (Xu & Tong, MICCAI 2024, "A Lightweight Boundary-assisted UNet for Skin Lesion Segmentation"),
adapted to reconstruction: 2 channels in and out, no sigmoid, the output added to the input image.

Written from the paper's description (its public code has no licence):
- Group Shuffle Attention (GSA): the channels are split into four groups; in each group a Hadamard
  product attention multiplies the features by a learned map (a small learned "shared space" resized to
  the feature size and refined by a depthwise 3×3 conv); the groups are concatenated and
  channel-shuffled so information crosses groups, normalised, and a 1×1 conv sets the output width.
- Prediction map auxiliary (PMA): at every decoder scale a 1×1 conv predicts a region map and a boundary
  map (region & boundary prediction, RBP); the prediction information fusion (PIF) gates the encoder skip
  with both maps before it joins the decoder. The paper supervises these maps with masks; for
  reconstruction there are none, so here they are learned gates. (The GA-based boundary generator only
  makes segmentation training targets and has no place here.)
Encoder: three 3×3 conv stages and three GSA stages, widths c1..c6, five 2× poolings; the decoder mirrors
it. H and W are reflect-padded to a multiple of 32 and cropped back.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.padding import crop_to, pad_to_multiple

# The Kronecker version (`kron_lbunet*`): the full convs and the 1×1 convs at n = 2. `convert` leaves the
# depthwise 3×3 convs dense (one input channel per group does not divide by 2) and records why.
KRON_SETTINGS: dict = dict(n=2, exclude=None, overrides=None)

GROUPS = 4


class ChannelNorm(nn.GroupNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (GroupNorm with one group per sample)."""

    def __init__(self, channels: int):
        super().__init__(1, channels)


class HadamardAttention(nn.Module):
    """x ⊙ A: a learned `space`² map per channel, resized to H×W and refined by a depthwise 3×3 conv,
    multiplies the features elementwise (channels mix afterwards, in the shuffle and the 1×1 projection)."""

    def __init__(self, channels: int, space: int = 8):
        super().__init__()
        self.space = nn.Parameter(torch.ones(1, channels, space, space))
        self.refine = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        space = F.interpolate(self.space, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return x * self.refine(space)


class GSA(nn.Module):
    """Group Shuffle Attention: four groups of Hadamard attention, channel shuffle, norm, 1×1 conv to `dim_out`."""

    def __init__(self, dim_in: int, dim_out: int, space: int = 8):
        super().__init__()
        if dim_in % GROUPS:
            raise ValueError(f"GSA needs dim_in divisible by {GROUPS}, got {dim_in}")
        self.norm_in = ChannelNorm(dim_in)
        self.groups = nn.ModuleList(HadamardAttention(dim_in // GROUPS, space) for _ in range(GROUPS))
        self.norm_out = ChannelNorm(dim_in)
        self.proj = nn.Conv2d(dim_in, dim_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(self.norm_in(x), GROUPS, dim=1)
        y = torch.cat([att(p) for att, p in zip(self.groups, parts)], dim=1)
        b, c, h, w = y.shape  # channel shuffle: (groups, c/groups) -> (c/groups, groups)
        y = y.view(b, GROUPS, c // GROUPS, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(self.norm_out(y) + x)


class PredictionFusion(nn.Module):
    """RBP + PIF: predict region and boundary maps from the decoder features (1×1 conv, sigmoid) and gate
    the encoder skip with them: skip + α ⊙ skip·region + β ⊙ skip·boundary (α, β per channel)."""

    def __init__(self, dec_channels: int, skip_channels: int):
        super().__init__()
        self.predict = nn.Conv2d(dec_channels, 2, 1)
        self.alpha = nn.Parameter(torch.full((1, skip_channels, 1, 1), 0.5))
        self.beta = nn.Parameter(torch.full((1, skip_channels, 1, 1), 0.5))

    def forward(self, dec: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        region, boundary = torch.sigmoid(self.predict(dec)).chunk(2, dim=1)
        return skip + self.alpha * skip * region + self.beta * skip * boundary


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class LBUNet(nn.Module):
    """LB-UNet for reconstruction: (B, in_chans, H, W) -> (B, in_chans, H, W), any H×W."""

    needs_kspace = False

    def __init__(self, in_chans: int = 2, widths: Sequence[int] = (8, 16, 24, 32, 48, 64), space: int = 8,
                 pad_mode: str = "reflect"):
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"LB-UNet takes six widths, got {list(widths)}")
        c1, c2, c3, c4, c5, c6 = widths
        self.in_chans, self.pad_mode = in_chans, pad_mode
        self.encoder = nn.ModuleList([
            _conv3(in_chans, c1), _conv3(c1, c2), _conv3(c2, c3),
            GSA(c3, c4, space), GSA(c4, c5, space), GSA(c5, c6, space)])
        self.enc_norms = nn.ModuleList(nn.GroupNorm(GROUPS, c) for c in (c1, c2, c3, c4, c5))
        self.decoder = nn.ModuleList([
            GSA(c6, c5, space), GSA(c5, c4, space), GSA(c4, c3, space), _conv3(c3, c2), _conv3(c2, c1)])
        self.dec_norms = nn.ModuleList(nn.GroupNorm(GROUPS, c) for c in (c5, c4, c3, c2, c1))
        self.fusions = nn.ModuleList(PredictionFusion(c, c) for c in (c5, c4, c3, c2, c1))
        self.head = nn.Conv2d(c1, in_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, 32, self.pad_mode)
        skips, y = [], padded
        for stage, norm in zip(self.encoder[:5], self.enc_norms):  # five stages, each pooled by 2
            y = F.gelu(F.max_pool2d(norm(stage(y)), 2))
            skips.append(y)
        y = F.gelu(self.encoder[5](y))  # bottleneck at 1/32
        for i, (stage, norm, fuse) in enumerate(zip(self.decoder, self.dec_norms, self.fusions)):
            y = F.gelu(norm(stage(y)))
            if i > 0:  # the first decoder stage already sits at the deepest skip's scale
                y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=True)
            skip = skips[4 - i]
            y = y + fuse(y, skip)
        y = F.interpolate(self.head(y), scale_factor=2.0, mode="bilinear", align_corners=True)
        return crop_to(padded + y, size)


def lbunet_small(in_chans: int = 2, **kwargs) -> LBUNet:
    """LB-UNet at its original widths 8, 16, 24, 32, 48, 64 (40.8 k parameters)."""
    return LBUNet(in_chans=in_chans, widths=(8, 16, 24, 32, 48, 64), **kwargs)


def lbunet(in_chans: int = 2, **kwargs) -> LBUNet:
    """LB-UNet widened (about 6.7×) to 1.03 M parameters, the size in the Kronecker paper's Table 1 (1.025 M)."""
    return LBUNet(in_chans=in_chans, widths=(52, 108, 160, 216, 320, 428), **kwargs)
