"""Trained-model tasks that ship offline: a dense model, deterministic data, supervised training and
unlabelled input batches (for calibration and distillation), with the trained dense weights cached under
out/compress/<name>-seed<seed>.pt.

Dense training, one torch thread, on a 2-core AMD EPYC shared with other jobs (load average 4-9 during the
runs, so these wall times are inflated; the per-step time of 20 steps on the then lightly loaded machine is in
brackets): digits_cnn 600 steps 62 s (0.09 s/step, ~55 s), test accuracy 1.000; shapes_cnn 1,000 steps 735 s
(0.10 s/step, ~105 s), 0.9745; tiny_bert 1,200 steps 364 s (0.058 s/step, ~70 s), 0.9995.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronify.batches import call_model, output_tensor

OUT = Path(__file__).resolve().parents[2] / "out" / "compress"


@dataclass
class Data:
    """Train and test tensors; x holds images (N, C, H, W) or token ids (N, L), y class labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _identity(x: Tensor, g: torch.Generator) -> Tensor:
    return x


def _as_input(x: Tensor) -> Any:
    return x


def random_shift(x: Tensor, g: torch.Generator, pad: int = 2, flip: bool = False) -> Tensor:
    """Each image shifted by up to `pad` pixels in each direction (zero fill), optionally mirrored left-right."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=g))
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    out = xp[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(b, generator=g) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out.contiguous()


@dataclass
class Task:
    """A trained-model task. `build()` gives a fresh dense model; `to_inputs` turns rows of x into a model input."""

    name: str
    build: Callable[[], nn.Module]
    make_data: Callable[[], Data]
    dense_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    augment: Callable[[Tensor, torch.Generator], Tensor] = _identity
    to_inputs: Callable[[Tensor], Any] = _as_input
    features: tuple[str, ...] = ()   # hidden modules for feature-matching distillation
    note: str = field(default="")

    @cached_property
    def data(self) -> Data:
        return self.make_data()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of the model's logits on rows x with labels y."""
        return F.cross_entropy(output_tensor(call_model(model, self.to_inputs(x))), y)

    def _rows(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless shuffled, augmented (x, y) training batches."""
        g = torch.Generator().manual_seed(seed)
        d = self.data
        while True:
            perm = torch.randperm(len(d.y_train), generator=g)
            for i in range(0, len(perm) - self.batch_size + 1, self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield self.augment(d.x_train[idx], g), d.y_train[idx]

    def train(self, model: nn.Module, steps: int, seed: int = 0, lr: float | None = None) -> nn.Module:
        """Supervised training: AdamW, 5 % linear warm-up then cosine decay, gradient norm clipped at 1.
        Leaves the model in eval mode."""
        torch.manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr or self.lr, weight_decay=self.weight_decay)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
        model.train()
        for _, (x, y) in zip(range(steps), self._rows(seed + 1000)):
            loss = self.loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        return model.eval()

    @torch.no_grad()
    def metric(self, model: nn.Module, batch: int = 500) -> float:
        """Test accuracy (the model's mode is restored)."""
        was_training = model.training
        model.eval()
        d = self.data
        correct = 0
        for i in range(0, len(d.y_test), batch):
            logits = output_tensor(call_model(model, self.to_inputs(d.x_test[i:i + batch])))
            correct += int((logits.argmax(-1) == d.y_test[i:i + batch]).sum())
        model.train(was_training)
        return correct / len(d.y_test)

    def unlabelled_batches(self, seed: int = 0) -> Iterator[Any]:
        """Endless training inputs (augmented as in training), no labels."""
        for x, _ in self._rows(seed + 2000):
            yield self.to_inputs(x)

    def calibration_batches(self, count: int, seed: int = 0) -> list[Any]:
        """`count` unlabelled training input batches."""
        return [b for _, b in zip(range(count), self.unlabelled_batches(seed))]

    def trained(self, seed: int = 0) -> nn.Module:
        """The dense model trained for `dense_steps` with `seed`; cached under out/compress/."""
        path = OUT / f"{self.name}-seed{seed}.pt"
        torch.manual_seed(seed)
        model = self.build()
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        self.train(model, self.dense_steps, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return model


# ----- digits_cnn ---------------------------------------------------------------------------------------

def _digits_data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=450, stratify=y, random_state=0)
    y = torch.tensor(y)
    return Data(x[idx_tr], y[idx_tr], x[idx_te], y[idx_te])


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def digits_cnn_model() -> nn.Module:
    """Five 3x3 conv blocks (32-32 | 64-64 | 128, BN+ReLU, two max-pools), global average pool, Linear(128, 10)."""
    return nn.Sequential(
        _conv_bn(1, 32), _conv_bn(32, 32), nn.MaxPool2d(2),
        _conv_bn(32, 64), _conv_bn(64, 64), nn.MaxPool2d(2),
        _conv_bn(64, 128), _conv_bn(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


# ----- shapes_cnn ---------------------------------------------------------------------------------------

SHAPES = ("disk", "ring", "square", "frame", "triangle", "plus", "cross", "hstripes", "vstripes", "checker")


def _shape_masks(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """The 10 SHAPES in local coordinates (u, v), each a boolean array like u."""
    r = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    d, e = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)

    def bar(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((np.abs(a) < 0.22) & (np.abs(b) < 0.9)) | ((np.abs(b) < 0.22) & (np.abs(a) < 0.9))

    return [r < 1, (r < 1) & (r > 0.6), box < 0.8, (box < 0.8) & (box > 0.52),
            (v < 0.7) & (np.abs(u) < 0.6 * (v + 0.8)), bar(u, v), bar(d, e),
            (r < 1) & (np.sin(v * 3 * math.pi) > 0), (r < 1) & (np.sin(u * 3 * math.pi) > 0),
            (box < 0.8) & (np.sin(u * 2.5 * math.pi) * np.sin(v * 2.5 * math.pi) > 0)]


def _shapes_images(n: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """n images of the 10 SHAPES at random position/scale/rotation/contrast, with 2-4 line segments of
    clutter and Gaussian noise (sigma 0.25)."""
    rng = np.random.default_rng(seed)
    grid = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(grid, grid)
    labels = rng.integers(0, 10, n)
    c = lambda a: a[:, None, None]   # noqa: E731  per-image scalars against the pixel grid
    cx, cy, scale = c(rng.uniform(-0.45, 0.45, n)), c(rng.uniform(-0.45, 0.45, n)), c(rng.uniform(0.35, 0.6, n))
    angle = c(rng.uniform(-0.35, 0.35, n))
    u = (np.cos(angle) * (x - cx) + np.sin(angle) * (y - cy)) / scale
    v = (-np.sin(angle) * (x - cx) + np.cos(angle) * (y - cy)) / scale
    masks = np.empty(u.shape, bool)
    for k in range(len(SHAPES)):
        masks[labels == k] = _shape_masks(u[labels == k], v[labels == k])[k]
    img = c(rng.uniform(0.5, 1.0, n)) * masks
    segments = rng.integers(2, 5, n)
    for j in range(4):
        p, q = rng.uniform(-1, 1, (2, n)), rng.uniform(-1, 1, (2, n))
        px, py, dx, dy = c(p[0]), c(p[1]), c(q[0] - p[0]), c(q[1] - p[1])
        t = np.clip(((x - px) * dx + (y - py) * dy) / (dx ** 2 + dy ** 2 + 1e-9), 0, 1)
        line = np.hypot(x - px - t * dx, y - py - t * dy) < 0.05
        img = np.maximum(img, c(rng.uniform(0.25, 0.6, n) * (j < segments)) * line)
    img = img + rng.normal(0, 0.25, img.shape)
    return torch.from_numpy(img.astype(np.float32)).unsqueeze(1), torch.from_numpy(labels)


def _shapes_data() -> Data:
    x_tr, y_tr = _shapes_images(12000, seed=1)
    x_te, y_te = _shapes_images(2000, seed=2)
    return Data(x_tr, y_tr, x_te, y_te)


class _Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus (projected) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.skip(x))


def shapes_resnet() -> nn.Module:
    """Stem conv 1->32 (32x32), residual blocks 32@16², 64@8², 128@4², 256@2², global pool, Linear(256, 10)."""
    return nn.Sequential(_conv_bn(1, 32), _Block(32, 32, 2), _Block(32, 64, 2), _Block(64, 128, 2),
                         _Block(128, 256, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


# ----- tiny_bert ----------------------------------------------------------------------------------------

VOCAB, SEQ, GROUPS = 64, 32, 4


def _bert_data() -> Data:
    """Sequences [CLS] + 31 tokens from 60 tokens in 4 hidden groups (a fixed random map), each sequence with
    Dirichlet(1) group proportions; the label is the group with most tokens (sequences with a tie dropped)."""
    rng = np.random.default_rng(0)
    members = rng.permutation(np.arange(4, VOCAB)).reshape(GROUPS, -1)   # 15 tokens per group
    p = rng.dirichlet(np.ones(GROUPS), size=30000)
    groups = (rng.random((30000, SEQ - 1, 1)) > np.cumsum(p, 1)[:, None, :-1]).sum(-1)
    counts = np.stack([(groups == g).sum(1) for g in range(GROUPS)], 1)
    keep = (counts == counts.max(1, keepdims=True)).sum(1) == 1
    tokens = members[groups, rng.integers(0, members.shape[1], groups.shape)][keep][:24000]
    xs = np.concatenate([np.ones((len(tokens), 1), np.int64), tokens], 1)
    ys = counts.argmax(1)[keep][:24000]
    x, y = torch.tensor(xs), torch.tensor(ys)
    return Data(x[:20000], y[:20000], x[20000:], y[20000:])


def tiny_bert_model() -> nn.Module:
    """BertForSequenceClassification from a config: hidden 128, 2 layers, 4 heads, FFN 256, vocab 64, no dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=SEQ, type_vocab_size=1, num_labels=GROUPS,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _bert_inputs(x: Tensor) -> dict[str, Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


TASKS: dict[str, Task] = {
    "digits_cnn": Task("digits_cnn", digits_cnn_model, _digits_data, dense_steps=600, batch_size=64, lr=3e-3,
                       augment=random_shift, features=("1", "4", "7"),
                       note="load_digits 1,347/450 stratified, upsampled to 16x16"),
    "shapes_cnn": Task("shapes_cnn", shapes_resnet, _shapes_data, dense_steps=1000, batch_size=64, lr=3e-3,
                       augment=lambda x, g: random_shift(x, g, 2, flip=True), features=("1", "2", "3", "4"),
                       note="10 synthetic shape/texture classes, 32x32, clutter and noise, 12,000/2,000"),
    "tiny_bert": Task("tiny_bert", tiny_bert_model, _bert_data, dense_steps=1200, batch_size=64, lr=1e-3,
                      to_inputs=_bert_inputs, features=("bert.encoder.layer.0.output", "bert.encoder.layer.1.output"),
                      note="majority hidden token group of 31 tokens, 20,000/4,000"),
}
