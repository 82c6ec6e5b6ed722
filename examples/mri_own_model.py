"""Your own reconstruction network, dense and Kronecker, trained and compared on the demo data from Python.

Builds the embedded demo dataset (brain, fastMRI format; nothing is downloaded), defines a small residual CNN,
makes a Kronecker copy with kronify.convert (about half the parameters), trains both with the demo preset's
set-up (kronify.mri.experiments.run.train_and_test: flips, random phase, EMA, the paper's loss) and compares them with each
other and with zero-filling, paired over the test volumes.

    python examples/mri_own_model.py [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from torch import nn

import kronify
from kronify.mri.data.datasets import build_datasets
from kronify.mri.data.demo import build_demo_dataset
from kronify.mri.experiments.presets import get_preset
from kronify.mri.experiments.run import Hardware, train_and_test
from kronify.mri.experiments.study import compare_rows, row_over_seeds


class ResidualCNN(nn.Module):
    """Zero-filled image (2 channels: real, imaginary) in, a correction added to it out."""

    def __init__(self, width: int = 32, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(2, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 2, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kronify-mri-"))

    preset = get_preset("demo")
    root = build_demo_dataset(out / "data", **preset.demo_build).root
    datasets = build_datasets(root, out / "split.json", crop=preset.crop, accelerations=4,
                              num_slices=preset.num_slices)

    pl.seed_everything(0, verbose=False)
    dense = ResidualCNN()
    kron = copy.deepcopy(dense)
    kronify.convert(kron, n=2)  # every Conv2d becomes a sum of 2 Kronecker products
    runs = {}
    for name, model in (("dense", dense), ("kronecker", kron)):
        result = train_and_test(model, preset, datasets, out / name, max_steps=args.steps,
                                hardware=Hardware(accelerator="cpu", progress_bar=False), info={"model": name})
        gain = result["vs_zero_filled"]["psnr"]
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, test PSNR "
              f"{result['psnr_mean']:.2f} dB, {gain['mean_difference']:+.2f} dB over zero-filling "
              f"(Wilcoxon p = {gain['wilcoxon_p']:.3g})")
        runs[name] = row_over_seeds([out / name], [0])
    diff = compare_rows(runs["kronecker"], runs["dense"])["psnr"]
    print(f"Kronecker minus dense: {diff.format(unit='dB')}")
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
