"""zoo.unet_ddpm (the paper's DDPM-style U-Net) and zoo.paper_reference (Table 1 reconciliation).

References are computed here from the architecture as the paper's official configuration describes it
(layer by layer: convs, GroupNorms, Linears, the attention block), not read from the modules under test:
parameter counts dense and Kronecker (Σ n³ + cin·cout·k²/n + bias per converted conv), the exact set of
layers a conversion leaves dense, and FLOPs (2·MAC per conv/matmul output element). The 56 M-parameter
official model is built (its conversions once per module) but never run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import zoo
from zoo import paper_reference, unet_ddpm
from zoo.paper_reference import OfficialConfig, PaperRow, flops_verdict, params_verdict
from zoo.summary import main as summary_main
from zoo.unet_ddpm import AttnBlock, DDPMUNet

OFFICIAL = dict(ch=64, ch_mult=(1, 2, 4, 8), num_res_blocks=2)


# ---- independent references ---------------------------------------------------------------------------

def layer_plan(ch: int, ch_mult, num_res_blocks: int, in_chans: int = 2):
    """The official architecture as a list of (kind, name, cin, cout, k) for every conv/linear/norm."""
    tdim, plan = 4 * ch, []
    plan += [("linear", "time_embedding.mlp.0", ch, tdim, 0), ("linear", "time_embedding.mlp.2", tdim, tdim, 0)]
    plan.append(("conv", "head", in_chans, ch, 3))

    def res(prefix, cin, cout, attn=False):
        plan.extend([("norm", f"{prefix}.block1.0", cin, cin, 0), ("conv", f"{prefix}.block1.2", cin, cout, 3),
                     ("linear", f"{prefix}.temb_proj.1", tdim, cout, 0), ("norm", f"{prefix}.block2.0", cout, cout, 0),
                     ("conv", f"{prefix}.block2.3", cout, cout, 3)])
        if cin != cout:
            plan.append(("conv", f"{prefix}.shortcut", cin, cout, 1))
        if attn:
            plan.append(("norm", f"{prefix}.attn.norm", cout, cout, 0))
            plan.extend(("attnconv", f"{prefix}.attn.proj_{p}", cout, cout, 1) for p in ("q", "k", "v", "out"))

    skips, now, i = [ch], ch, 0
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            res(f"downblocks.{i}", now, ch * mult)
            now, i = ch * mult, i + 1
            skips.append(now)
        if level < len(ch_mult) - 1:
            plan.append(("conv", f"downblocks.{i}.conv", now, now, 3))
            skips.append(now)
            i += 1
    res("middleblocks.0", now, now, attn=True)
    res("middleblocks.1", now, now)
    i = 0
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            res(f"upblocks.{i}", now + skips.pop(), ch * ch_mult[level])
            now, i = ch * ch_mult[level], i + 1
        if level:
            plan.append(("conv", f"upblocks.{i}.conv", now, now, 3))
            i += 1
    plan += [("norm", "tail.0", now, now, 0), ("conv", "tail.2", now, in_chans, 3)]
    return plan


def expected_params(ch, ch_mult, num_res_blocks, n=None):
    """Dense count, or the Kronecker count at n: convs (not the attention's) whose widths divide by n hold
    n·n² + n·(cout/n)·(cin/n)·k² weights + cout biases; everything else keeps its dense count."""
    total = 0
    for kind, _, cin, cout, k in layer_plan(ch, ch_mult, num_res_blocks):
        if kind == "norm":
            total += 2 * cin
        elif kind == "linear":
            total += cin * cout + cout
        elif n and kind == "conv" and cin % n == 0 and cout % n == 0:
            total += n ** 3 + cin * cout * k * k // n + cout
        else:
            total += cin * cout * k * k + cout
    return total


def expected_dense_after_conversion(ch, ch_mult, num_res_blocks, n):
    """Names of the layers a conversion at n must leave dense: every Linear, the attention's 1×1 convs,
    and convs whose widths do not divide by n."""
    return {name for kind, name, cin, cout, _ in layer_plan(ch, ch_mult, num_res_blocks)
            if kind in ("linear", "attnconv") or (kind == "conv" and (cin % n or cout % n))}


def expected_flops(ch, ch_mult, num_res_blocks, batch, size):
    """2·MAC of one forward at size×size (a multiple of 2^(levels-1)): convs at their output resolution,
    the embedding Linears (the time MLP once, each block's projection per sample), q·kᵀ and attn·v."""
    res, tdim = size, 4 * ch
    total = 2 * (ch * tdim + tdim * tdim)
    for kind, name, cin, cout, k in layer_plan(ch, ch_mult, num_res_blocks):
        if name.endswith(".conv"):  # stride-2 downsampling conv, or the conv after a nearest ×2 upsampling
            res = res // 2 if name.startswith("downblocks") else res * 2
        if kind in ("conv", "attnconv"):
            total += 2 * batch * cin * cout * k * k * res * res
        elif kind == "linear" and "temb_proj" in name:
            total += 2 * batch * cin * cout
        if name.endswith("attn.proj_v"):
            total += 2 * (2 * batch * (res * res) ** 2 * cout)
    return total


def count(model):
    return sum(p.numel() for p in model.parameters())


# ---- parameter counts --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_kron_reports():
    """{n: ConversionReport} of the official configuration converted at n = 2 and 4 (built once, on the CPU)."""
    torch.manual_seed(0)
    return {n: zoo.create_kron("unet_ddpm", n=n)[1] for n in (2, 4)}


def test_official_configuration_exact_counts(official_kron_reports):
    assert expected_params(**OFFICIAL) == unet_ddpm.PARAMS_DENSE == 56_573_442
    assert expected_params(**OFFICIAL, n=2) == unet_ddpm.PARAMS_KRON_N2 == 29_625_242
    with torch.device("meta"):
        assert count(zoo.create("unet_ddpm")) == unet_ddpm.PARAMS_DENSE
    report = official_kron_reports[2]
    assert count(report.model) == report.params_after == unet_ddpm.PARAMS_KRON_N2
    # the approximate figures
    assert round(unet_ddpm.PARAMS_DENSE / 1e6, 1) == 56.6 and round(unet_ddpm.PARAMS_KRON_N2 / 1e6, 1) == 29.6


@pytest.mark.parametrize("n", [2, 4])
def test_official_configuration_layers_left_dense(n, official_kron_reports):
    report = official_kron_reports[n]
    expected = expected_dense_after_conversion(**OFFICIAL, n=n)
    assert set(report.skipped) == expected
    convs = {name for kind, name, *_ in layer_plan(**OFFICIAL) if kind == "conv"}
    assert set(report.converted) == convs - expected
    assert report.params_after == count(report.model) == expected_params(**OFFICIAL, n=n)
    if n == 4:  # the 2-channel head and tail cannot be split over 4 input/output blocks
        assert {"head", "tail.2"} <= set(report.skipped)


@pytest.mark.parametrize("n", [2, 4])
def test_tiny_kron_model_layers_left_dense(n):
    torch.manual_seed(0)
    model, report = zoo.create_kron("unet_ddpm_tiny", n=n)
    cfg = dict(ch=4, ch_mult=(1, 2, 4, 8), num_res_blocks=1)
    assert set(report.skipped) == expected_dense_after_conversion(**cfg, n=n)
    assert count(model) == expected_params(**cfg, n=n)
    assert all(reason for reason in report.skipped.values())


@settings(max_examples=25, deadline=None)
@given(ch=st.sampled_from([2, 4, 8]), ch_mult=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       num_res_blocks=st.integers(1, 3))
def test_param_count_formula_any_configuration(ch, ch_mult, num_res_blocks):
    with torch.device("meta"):
        model = DDPMUNet(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, norm_groups=ch // 2 or 1)
    assert count(model) == expected_params(ch, ch_mult, num_res_blocks)


def test_presets_and_bad_configuration():
    assert count(zoo.create("unet_ddpm_demo")) == expected_params(8, (1, 2, 4, 8), 2)
    assert count(zoo.create("unet_ddpm_tiny")) == expected_params(4, (1, 2, 4, 8), 1)
    with pytest.raises(ValueError, match=r"norm_groups=32.*widths \[8, 16\]"):
        DDPMUNet(ch=8, ch_mult=(1, 2), norm_groups=32)
    with pytest.raises(ValueError, match="attn_levels"):
        DDPMUNet(ch=4, ch_mult=(1, 2), norm_groups=2, attn_levels=(2,))


# ---- behaviour ---------------------------------------------------------------------------------------

def test_zero_step_embedding_is_sin0_cos0():
    model = zoo.create("unet_ddpm_tiny")
    assert torch.equal(model.time_embedding.zero_step, torch.tensor([0.0, 1.0] * 2))


def test_attention_block_matches_explicit_softmax():
    torch.manual_seed(0)
    block = AttnBlock(8, norm_groups=2)
    torch.nn.init.normal_(block.proj_out.weight)  # the official near-zero init would hide the attention
    x = torch.randn(2, 8, 3, 5)
    h = F.group_norm(x, 2, block.norm.weight, block.norm.bias)
    q, k, v = (F.conv2d(h, p.weight, p.bias).flatten(2) for p in (block.proj_q, block.proj_k, block.proj_v))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 3, 5)
    ref = x + F.conv2d(out, block.proj_out.weight, block.proj_out.bias)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["unet_ddpm_tiny", "kron_unet_ddpm_tiny"])
def test_any_size_forward_backward(name):
    torch.manual_seed(0)
    model = zoo.create(name)
    x = torch.randn(2, 2, 37, 45)  # not a multiple of 8
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_flops_match_the_formula():
    model = zoo.create("unet_ddpm_tiny").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 2, 16, 16))
    assert counter.get_total_flops() == expected_flops(4, (1, 2, 4, 8), 1, batch=2, size=16)


# ---- reconciliation with the paper's Table 1 -------------------------------------------------------------

def test_verdicts():
    table = {r.label: r for r in (PaperRow("A", 1.0, 10.0), PaperRow("B", 2.63, 1.0))}
    assert params_verdict(1_005_000, table["A"], table).startswith("matches (+0.5%)")
    text = params_verdict(2_628_000, table["A"], table)
    assert text.startswith("does not match: ours is 2.63×") and "matches the table's B count instead" in text
    assert params_verdict(5, None, table) == "not in Table 1"
    assert flops_verdict(20_000_000_000, table["A"]).startswith("matches as MAC")
    assert flops_verdict(10_100_000_000, table["A"]).startswith("matches as 2·MAC")
    assert flops_verdict(100_000_000_000, table["A"]).startswith("does not match: ours is 5.00×")


def test_kronecker_swinmr_official_counts():
    """The issue's counts of the official Kronecker SwinMR config (embed 120, depths 6×6, heads 6, window 8)."""
    by_label = {c.label: c for c in paper_reference.OFFICIAL_CONFIGS}
    n2 = count(paper_reference.build(by_label["Kronecker SwinMR, n = 2"]))
    n4 = count(paper_reference.build(by_label["Kronecker SwinMR, n = 4"]))
    assert round(n2 / 1e6, 3) == 2.628 and round(n4 / 1e6, 3) == 1.373


def test_reconciliation_rows_and_cli(monkeypatch, capsys):
    config = OfficialConfig("tiny Kronecker U-Net", "unet_ddpm_tiny", n=2, paper="Kronecker U-Net")
    rows, markdown = paper_reference.reconciliation_table(16, [config])
    (row,) = rows
    assert row["params"] == expected_params(4, (1, 2, 4, 8), 1, n=2)
    assert row["flops"] == expected_flops(4, (1, 2, 4, 8), 1, batch=1, size=16) and row["macs"] * 2 == row["flops"]
    assert (row["paper_params_m"], row["paper_gflops"]) == (2.630, 1.075)
    assert row["params_verdict"].startswith("does not match") and row["flops_verdict"].startswith("does not match")
    assert "| tiny Kronecker U-Net |" in markdown and "GMAC @16²" in markdown
    monkeypatch.setattr(paper_reference, "OFFICIAL_CONFIGS", (config,))
    assert summary_main(["--paper", "--size", "16"]) == 0
    assert "| tiny Kronecker U-Net |" in capsys.readouterr().out
