"""Efficient U-Net: timm's efficientnet_b0 (features_only, in_chans=2, no pretrained weights) as the
encoder, and a light U-Net decoder: at each scale a 2× bilinear upsample, concatenation with the
encoder feature of that scale, one 3×3 conv + BatchNorm + ReLU. A last 3×3 conv at full resolution and
a 1×1 head give 2 channels, added to the input image. About 3.9 M parameters (3.595 M encoder).
H and W are reflect-padded to a multiple of 32 (five stride-2 stages) and cropped back.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.padding import crop_to, pad_to_multiple

# The Kronecker version (`kron_efficient_unet`): every full and 1×1 conv at n = 2, encoder included.
# `convert` leaves EfficientNet's depthwise convs dense (one input channel per group) and records why.
KRON_SETTINGS: dict = dict(n=2, exclude=None, overrides=None)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EfficientUNet(nn.Module):
    """(B, in_chans, H, W) -> (B, in_chans, H, W), any H×W."""

    needs_kspace = False

    def __init__(self, in_chans: int = 2, encoder: str = "efficientnet_b0",
                 decoder_channels: Sequence[int] = (64, 48, 32, 24, 16), pad_mode: str = "reflect"):
        super().__init__()
        self.in_chans, self.pad_mode = in_chans, pad_mode
        self.encoder = timm.create_model(encoder, features_only=True, in_chans=in_chans, pretrained=False)
        enc = self.encoder.feature_info.channels()  # e.g. [16, 24, 40, 112, 320] at strides 2..32
        if len(enc) != 5 or len(decoder_channels) != 5:
            raise ValueError(f"expected 5 encoder stages and 5 decoder widths, got {enc} and {list(decoder_channels)}")
        ins = [enc[4] + enc[3]] + [d + s for d, s in zip(decoder_channels[:3], enc[2::-1])]
        self.decoder = nn.ModuleList(_conv_bn_relu(i, o) for i, o in zip(ins, decoder_channels[:4]))
        self.final = _conv_bn_relu(decoder_channels[3], decoder_channels[4])
        self.head = nn.Conv2d(decoder_channels[4], in_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, 32, self.pad_mode)
        feats = self.encoder(padded)
        y = feats[-1]
        for block, skip in zip(self.decoder, feats[-2::-1]):
            y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        return crop_to(padded + self.head(self.final(y)), size)


def efficient_unet(in_chans: int = 2, **kwargs) -> EfficientUNet:
    """EfficientNet-B0 encoder + light U-Net decoder (about 3.9 M parameters; the paper's table: 3.896 M)."""
    return EfficientUNet(in_chans=in_chans, **kwargs)
