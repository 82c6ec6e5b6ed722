"""Compress a trained network to about half its parameters and keep what it knows: calibrate, convert, distill.

A small CNN is trained first on scikit-learn's digits (standing in for your own trained model); then the
whole flow: calibrated warm start -> distillation on unlabelled inputs -> evaluation -> save / load.
Run: python examples/compress_trained.py   (about a minute on 2 CPU cores)
"""

import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

import kronify

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
accuracy = lambda m: (m.eval()(x_test).argmax(1) == y_test).float().mean().item()  # noqa: E731


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


teacher = nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 64), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(64, 10))
opt = torch.optim.AdamW(teacher.parameters(), 3e-3)
for step in range(400):  # your trained model would be loaded here instead
    i = torch.randint(0, len(x_train), (64,))
    loss = nn.functional.cross_entropy(teacher.train()(x_train[i]), y_train[i])
    opt.zero_grad(), loss.backward(), opt.step()

# --- the user code: about 15 lines -----------------------------------------------------------------------------
unlabelled = [x_train[i:i + 64] for i in range(0, 512, 64)]  # inputs only, no labels
student = copy.deepcopy(teacher)
report = kronify.convert(student, n=2, warm_start=True, calibration=unlabelled)
print(report)
print(f"dense {accuracy(teacher):.3f}, calibrated warm start {accuracy(student):.3f}")

endless = (x_train[torch.randint(0, len(x_train), (64,))] for _ in iter(int, 1))
kronify.distill(student, teacher, endless, steps=40, lr=1e-3, loss="kl", progress=False)
print(f"after 40 distillation steps {accuracy(student):.3f} with {report.ratio:.2f} of the parameters")

kronify.save(student, "digits_kron.safetensors", config=report.config)
restored = kronify.load(copy.deepcopy(teacher), "digits_kron.safetensors")
assert torch.equal(restored.eval()(x_test), student.eval()(x_test))
