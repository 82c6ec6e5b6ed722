"""Convert several timm / torchvision models (random init, nothing downloaded) with kronify.

Prints the full conversion report of the first model, a one-line summary per model and a table of
warm-start errors: the mean, over converted layers, of the relative Frobenius error of the nearest
Kronecker sum with `terms` terms. For an unstructured (i.i.d. random) weight the n² singular values of
the rearranged matrix are about equal, so keeping `terms` of them leaves an error of about
sqrt(1 - terms/n²): sqrt(1 - 1/n) at the default terms = n. That is why a warm-started model still
needs fine-tuning. Run: `python examples/convert_models.py` (this is what `make demo` runs).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning
# threads of a 2-thread pool make every op wait for a descheduled core (10x slower here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting)

import kronify  # noqa: E402

MODELS = [
    ("torchvision", "resnet18"),
    ("timm", "convnext_atto"),
    ("timm", "vit_tiny_patch16_224"),
    ("torchvision", "mobilenet_v3_small"),
    ("timm", "efficientnet_b0"),
    ("timm", "swin_tiny_patch4_window7_224"),
]
SETTINGS = [(2, 1), (2, 2), (4, 1), (4, 4)]  # (n, terms)


def build(source: str, name: str) -> torch.nn.Module:
    """The architecture with random weights (pretrained=False)."""
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    summaries, errors = [], []
    for i, (source, name) in enumerate(MODELS):
        model = build(source, name).eval()
        report = kronify.convert(model, n=2, warm_start=True, inplace=False)
        if i == 0:
            print(f"== {source}:{name}, n=2, terms=2, warm start ==")
            print(report, end="\n\n")
        summaries.append((f"{source}:{name}", report))
        row = []
        for n, terms in SETTINGS:
            r = report if (n, terms) == (2, 2) else kronify.convert(
                model, n=n, terms=terms, warm_start=True, inplace=False)
            errs = [x.warm_start_error for x in r.rows if x.status == "converted"]
            row.append(statistics.fmean(errs))
        errors.append((f"{source}:{name}", row))

    print("== conversion summary, n=2 (default terms = n) ==")
    width = max(len(name) for name, _ in summaries)
    print(f"{'model':<{width}}  {'params':>12}  {'after':>12}  {'ratio':>6}  {'layers':>6}  {'conv.':>5}  analysis")
    for name, r in summaries:
        print(f"{name:<{width}}  {r.params_before:>12,}  {r.params_after:>12,}  {r.ratio:>6.3f}  "
              f"{len(r.rows):>6}  {len(r.converted):>5}  {'torch.fx' if r.traced else 'named_modules'}")

    print("\n== warm-start error: mean relative Frobenius error per converted layer ==")
    heads = [f"n={n},t={t}" for n, t in SETTINGS]
    print(f"{'model':<{width}}  " + "  ".join(f"{h:>8}" for h in heads))
    for name, row in errors:
        print(f"{name:<{width}}  " + "  ".join(f"{e:>8.3f}" for e in row))
    ref = [math.sqrt(1 - t / n**2) for n, t in SETTINGS]
    print(f"{'i.i.d. sqrt(1-t/n²)':<{width}}  " + "  ".join(f"{e:>8.3f}" for e in ref))
    print(f"\n{len(MODELS)} models in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
