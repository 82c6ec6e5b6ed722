"""SwinMR: shifted-window attention equals full attention with a mask built the naive way, and
kronify.convert reaches every qkv / proj / MLP Linear."""

from __future__ import annotations

import pytest
import torch

import kronify

import zoo
from zoo.swinmr import SwinLayer, shifted_window_mask


def naive_layer(layer: SwinLayer, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The Swin layer computed without windows, rolls or the efficient mask: full attention over all
    H·W tokens where token p may attend token q only if both lie in the same window of a grid of
    window-sized cells that starts at offset `shift` in the image (cells cut by the border are their
    own, smaller windows), with the relative position bias looked up by their coordinate difference."""
    ws, s = layer.window_size, layer.shift_size
    attn = layer.attn
    b, length, c = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    cell_r = torch.div(rows - s, ws, rounding_mode="floor")
    cell_c = torch.div(cols - s, ws, rounding_mode="floor")
    allowed = (cell_r[:, None] == cell_r[None]) & (cell_c[:, None] == cell_c[None])
    dr = rows[:, None] - rows[None]
    dc = cols[:, None] - cols[None]
    index = ((dr + ws - 1) * (2 * ws - 1) + dc + ws - 1).clamp(0, (2 * ws - 1) ** 2 - 1)
    bias = attn.rel_pos.relative_position_bias_table[index].permute(2, 0, 1)  # heads, L, L

    y = layer.norm1(x)
    q, k, v = attn.qkv(y).reshape(b, length, 3, heads, hd).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5 + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, c)
    x = x + attn.proj(out)
    return x + layer.mlp(layer.norm2(x))


@pytest.mark.parametrize("h,w", [(8, 8), (8, 12), (16, 8)])
@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_naive_reference(h, w, shift):
    torch.manual_seed(0)
    layer = SwinLayer(dim=12, num_heads=3, window_size=4, shift_size=shift).double().eval()
    torch.nn.init.normal_(layer.attn.rel_pos.relative_position_bias_table, std=1.0)  # make the bias matter
    x = torch.randn(2, h * w, 12, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x, (h, w))
        want = naive_layer(layer, x, h, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_shift_mask_blocks_only_wrapped_pairs():
    mask = shifted_window_mask(8, 8, window=4, shift=2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped tokens
    assert torch.isinf(mask[-1]).any() and (mask.diagonal(dim1=1, dim2=2) == 0).all()


def test_every_attention_and_mlp_linear_is_converted():
    model, report = zoo.create_kron("swinmr_demo")
    linear_names = [n for n, m in model.named_modules()
                    if n.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))]
    assert len(linear_names) == 4 * sum((2, 2))
    for name in linear_names:
        module = model.get_submodule(name)
        assert isinstance(module, torch.nn.Linear) and kronify.is_kron(module), name
        assert name in report.converted
    assert not report.skipped


def test_one_channel_build_keeps_only_its_one_channel_convs_dense():
    model, report = zoo.create_kron("swinmr_demo", in_chans=1)
    assert set(report.skipped) == {"conv_first", "conv_last"}
