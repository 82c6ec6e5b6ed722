"""Model registry: `create(name, **overrides)`, `names()`, and the Kronecker variants made by `kronify.convert`.

Every dense model `X` has Kronecker variants `kron_X` (learned algebra) and `kron_X_complex` (A fixed to
the complex multiplication rule, n = 2). They are never hand-written: `create_kron` builds the dense model
and runs `kronify.convert` on it with the settings stated once, as `KRON_SETTINGS`, next to each model
class. The conversion report is returned by `create_kron` and attached to the model as `model.kron_report`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from zoo import efficient_unet, lbunet, modl, swinmr, unet, unet_ddpm

# name -> (factory, the module that states that family's KRON_SETTINGS)
_MODELS: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "unet": (unet.unet, unet),
    "unet_demo": (unet.unet_demo, unet),
    "unet_ddpm": (unet_ddpm.unet_ddpm, unet_ddpm),
    "unet_ddpm_demo": (unet_ddpm.unet_ddpm_demo, unet_ddpm),
    "unet_ddpm_tiny": (unet_ddpm.unet_ddpm_tiny, unet_ddpm),
    "swinmr": (swinmr.swinmr, swinmr),
    "swinmr_paper": (swinmr.swinmr_paper, swinmr),
    "swinmr_demo": (swinmr.swinmr_demo, swinmr),
    "modl": (modl.modl, modl),
    "modl_demo": (modl.modl_demo, modl),
    "lbunet_small": (lbunet.lbunet_small, lbunet),
    "lbunet": (lbunet.lbunet, lbunet),
    "efficient_unet": (efficient_unet.efficient_unet, efficient_unet),
}

KRON_PREFIX = "kron_"
COMPLEX_SUFFIX = "_complex"


def dense_names() -> list[str]:
    """Names of the dense models."""
    return list(_MODELS)


def variant_name(name: str, n: int = 0, algebra: str = "learned") -> str:
    """The name of dense model `name`'s variant, as runs and tables name it: `name` (n = 0, dense), `kron_<name>`
    (n = 2), `kron_<name>_n4` (other n), each with `_complex` for the fixed complex algebra."""
    if n == 0:
        return name
    return f"{KRON_PREFIX}{name}{'' if n == 2 else f'_n{n}'}" + (COMPLEX_SUFFIX if algebra == "complex" else "")


def names() -> list[str]:
    """Every name `create` accepts: dense models, then `kron_<name>`, then `kron_<name>_complex`."""
    base = dense_names()
    return base + [variant_name(b, 2) for b in base] + [variant_name(b, 2, "complex") for b in base]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")


def kron_settings(name: str) -> dict[str, Any]:
    """The conversion settings (n, exclude, overrides) of dense model `name`, as stated next to its class."""
    if name not in _MODELS:
        raise _unknown(name)
    return dict(_MODELS[name][1].KRON_SETTINGS)


def parse_name(name: str) -> tuple[str, bool, str]:
    """Split a registry name into (dense name, is_kron, algebra)."""
    if name in _MODELS:
        return name, False, "learned"
    if name.startswith(KRON_PREFIX):
        base, algebra = name[len(KRON_PREFIX):], "learned"
        if base not in _MODELS and base.endswith(COMPLEX_SUFFIX):
            base, algebra = base[: -len(COMPLEX_SUFFIX)], "complex"
        if base in _MODELS:
            return base, True, algebra
    raise _unknown(name)


def create_kron(name: str, *, n: int | None = None, terms: int | None = None, algebra: str | None = None,
                warm_start: bool = False, **overrides: Any):
    """Build dense model `name` (a dense name, or a `kron_…` name) with `overrides` and convert it.

    Returns (model, report); `n`, `terms`, `algebra` override the model's KRON_SETTINGS.
    """
    import kronify

    base, _, name_algebra = parse_name(name)
    settings = kron_settings(base)
    if n is not None:
        settings["n"] = n
    kwargs = {k: v for k, v in settings.items() if v is not None}
    model = _MODELS[base][0](**overrides)
    report = kronify.convert(model, terms=terms, algebra=algebra or name_algebra, warm_start=warm_start, **kwargs)
    model = report.model
    model.kron_report = report
    return model, report


def create(name: str, **overrides: Any) -> nn.Module:
    """Build a model by registry name with constructor `overrides` (pretrained weights are never used).

    `kron_<name>` returns the converted model (its report is `model.kron_report`); for those names the
    keywords n, terms, algebra and warm_start go to the conversion, the rest to the model.
    """
    base, is_kron, _ = parse_name(name)
    if is_kron:
        return create_kron(name, **overrides)[0]
    return _MODELS[base][0](**overrides)


def example_inputs(model: nn.Module, size: tuple[int, int] = (320, 320), batch: int = 1,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   acceleration: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Positional inputs for `model`: (x,) for image models (`model.in_chans` channels, default 2); (x, mask, kspace) for k-space models
    (`needs_kspace`), with a random Cartesian column mask (centre kept) and the masked k-space of a
    random image, x its zero-filled image. On the meta device only shapes are made."""
    h, w = size
    chans = getattr(model, "in_chans", 2)
    if str(device) == "meta":
        x = torch.empty(batch, chans, h, w, device="meta", dtype=dtype)
        if not getattr(model, "needs_kspace", False):
            return (x,)
        return x, torch.empty(batch, 1, 1, w, device="meta", dtype=dtype), torch.empty_like(x)
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, chans, h, w, generator=g, dtype=dtype)
    if not getattr(model, "needs_kspace", False):
        return (image.to(device),)
    mask = (torch.rand(batch, 1, 1, w, generator=g) < 1.0 / acceleration)
    centre = max(1, w // 12)
    mask[..., (w - centre) // 2:(w - centre) // 2 + centre] = True
    mask = mask.to(dtype)
    kspace = mask * modl.fft2c(image)
    x = modl.ifft2c(kspace)
    return x.to(device), mask.to(device), kspace.to(device)
