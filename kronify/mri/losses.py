"""The composite reconstruction loss of the paper (its eq. 3), as the official code computes it.

    L = α · Charbonnier(image) + β · ½ [Charbonnier(Re F|x|, Re F|y|) + Charbonnier(Im F|x|, Im F|y|)]
        + γ · VGG19 perceptual(|x|, |y|)

with the official defaults α = 15, β = 0.1, γ = 0.0025, Charbonnier ε = 1e-9 (Whethe/HyperKron-MRI-Recon,
``options/*/train_*.json``; ``models/model/model_e2e_ir_m16.py`` ``total_loss``, ``models/loss.py``,
``utils/utils_fourier.py`` ``fft_map``; the same as SwinMR's). Inputs are channel-first complex images
(B, 2, H, W) in the network's normalized units; x the output, y the target.

- Image term: Charbonnier on the 2-channel complex image.
- Frequency term: F is the *unnormalised*, uncentred 2-D FFT (``torch.fft.fft2``) of each image's magnitude
  |x|; Charbonnier on its real parts and on its imaginary parts, averaged. Unnormalised means the spectrum's
  entries are ~sqrt(H·W) times the orthonormal ones, which is what gives β = 0.1 its weight: on a 4×
  zero-filled 96×96 demo slice β·freq is ~45 % of α·image (0.5 % with the orthonormal FFT of the complex
  image, this package's earlier version). Centring would only permute the entries, which a mean ignores.
  The official code calls ``torch.fft.fftn`` on the (B, 1, H, W) magnitudes with no ``dim``, so it also
  transforms the batch (and the size-1 channel) axis: each sample's term then depends on which other samples
  share its batch, and the term's size on the batch size (~sqrt(B) for errors uncorrelated across the batch).
  We transform each image on its own, so the loss of a sample is the same in any batch and on any number of
  processes (a global batch split over GPUs gives the same training).
- Perceptual term, as the official ``PerceptualLoss``: L1 between VGG19 features taken before the ReLU at
  conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (``features`` indices 2, 7, 16, 25, 34), weights
  0.1, 0.1, 1, 1, 1, on ImageNet mean/std-normalized input. The official code feeds the one-channel magnitude
  image, whose slice maximum is 1 under its normalisation; the normalization broadcasts it to 3 channels. We
  feed |x| divided by the per-sample max of the target magnitude (the same thing when that max is 1; [0, ~1] for
  any other data scale), replicated to 3 channels.

Charbonnier is the official ``mean(sqrt(d² + ε))`` (ε added to d², not squared) minus ``sqrt(ε)``: the constant
shift (3.2e-5 per term) makes identical inputs give exactly 0 and leaves the gradients identical.

The loss runs in float32 at least: half-precision inputs (a network's output under autocast) are upcast, so the
FFT never sees bf16/fp16 (:func:`kronify.mri.complex.fft_precision`).

The VGG19 is frozen, in eval mode, and deliberately *not* a registered submodule: it is absent from
``state_dict()``/``parameters()`` of any module holding the loss (so it stays out of checkpoints and
optimizers) and is moved to the input's device on first use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronify.mri.complex import fft_precision, to_complex
from kronify.mri.backbones import VGG19, load_backbone_state_dict

__all__ = ["CompositeLoss", "VGGPerceptualLoss", "build_vgg19_features", "charbonnier", "magnitude_spectrum"]

VGG_LAYERS = (2, 7, 16, 25, 34)  # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 (before their ReLU)
VGG_LAYER_WEIGHTS = (0.1, 0.1, 1.0, 1.0, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-9) -> Tensor:
    """mean(sqrt((x − y)² + eps)) − sqrt(eps): SwinMR's Charbonnier, shifted to be 0 at x == y."""
    diff = x - y
    floor = torch.sqrt(torch.full((), eps, dtype=diff.dtype, device=diff.device))
    return (torch.sqrt(diff * diff + eps) - floor).mean()


def magnitude_spectrum(x: Tensor) -> Tensor:
    """F|x|: the unnormalised, uncentred 2-D FFT of each image's magnitude, (B, 2, H, W) -> complex (B, H, W),
    in float32 at least. |x| is the complex modulus (its gradient is 0, not NaN, where x = 0)."""
    return torch.fft.fft2(to_complex(fft_precision(x)).abs())


def build_vgg19_features(weights_path: str | os.PathLike | None = None) -> nn.Sequential:
    """torchvision's VGG19 ``features`` with ImageNet weights from disk (MissingWeightsError when absent)."""
    from torchvision.models.vgg import cfgs, make_layers  # noqa: PLC0415  (models extra)

    state = load_backbone_state_dict(VGG19, weights_path)
    features = make_layers(cfgs["E"], batch_norm=False)
    prefix = "features."
    features.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return features


class VGGPerceptualLoss(nn.Module):
    """Weighted L1 between VGG19 pre-ReLU features of two (B, 3, H, W) images already in [0, 1].

    ``features``: a VGG19 ``features`` Sequential (e.g. torchvision's, or a randomly initialised one for tests);
    when None, the ImageNet weights are loaded from disk (see :mod:`kronify.mri.backbones`). Only the layers up to
    conv5_4 are kept; they are frozen, set to eval mode, and their ReLUs made out-of-place.
    """

    def __init__(
        self,
        features: nn.Sequential | None = None,
        *,
        weights_path: str | os.PathLike | None = None,
        layer_weights: tuple[float, ...] = VGG_LAYER_WEIGHTS,
    ) -> None:
        super().__init__()
        if features is None:
            features = build_vgg19_features(weights_path)
        last = VGG_LAYERS[-1]
        if len(features) <= last or not all(isinstance(features[i], nn.Conv2d) for i in VGG_LAYERS):
            raise ValueError(f"features must be a VGG19 `features` Sequential with Conv2d at indices {VGG_LAYERS}")
        if len(layer_weights) != len(VGG_LAYERS):
            raise ValueError(f"layer_weights needs {len(VGG_LAYERS)} entries, got {len(layer_weights)}")
        features = nn.Sequential(*list(features)[: last + 1])
        for m in features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # the captured pre-ReLU maps must not be overwritten
        self.features = features.eval().requires_grad_(False)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        """The backbone always stays in eval mode."""
        super().train(mode)
        self.features.eval()
        return self

    def _feats(self, x: Tensor) -> list[Tensor]:
        x = (x - self.mean) / self.std
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYERS:
                feats.append(x)
        return feats

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        fx = self._feats(x)
        with torch.no_grad():
            ft = self._feats(target)
        return sum(w * F.l1_loss(a, b) for w, a, b in zip(self.layer_weights, fx, ft))


class CompositeLoss(nn.Module):
    """α·Charbonnier(image) + β·½[Charbonnier(Re F|x|) + Charbonnier(Im F|x|)] + γ·VGG19 perceptual(|x|), for
    (B, 2, H, W) complex images (see the module docstring for F and the conventions).

    ``forward(output, target) -> (total, terms)`` where ``terms`` holds the unweighted, detached
    ``image``, ``freq`` and ``perceptual`` values (for logging); ``perceptual`` is 0 when γ = 0.

    γ > 0 needs VGG19 ImageNet weights: pass ``vgg_features`` (a VGG19 ``features`` Sequential), or
    ``vgg_weights_path``, or place torchvision's ``vgg19-dcbb9e9d.pth`` where :mod:`kronify.mri.backbones` looks.
    Without them construction raises :class:`kronify.mri.errors.MissingWeightsError`.
    """

    def __init__(
        self,
        alpha: float = 15.0,
        beta: float = 0.1,
        gamma: float = 0.0025,
        eps: float = 1e-9,
        *,
        vgg_features: nn.Sequential | None = None,
        vgg_weights_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.alpha, self.beta, self.gamma, self.eps = float(alpha), float(beta), float(gamma), float(eps)
        perceptual = None
        if self.gamma > 0:
            try:
                perceptual = VGGPerceptualLoss(vgg_features, weights_path=vgg_weights_path)
            except FileNotFoundError as exc:
                raise type(exc)(f"CompositeLoss(gamma={gamma}) needs VGG19 weights. {exc} "
                                f"Or set gamma=0 to train without the perceptual term.") from exc
        # Not registered as a submodule: keeps the frozen VGG out of state_dict(), parameters() and checkpoints.
        object.__setattr__(self, "perceptual", perceptual)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, eps={self.eps}"

    def _perceptual(self, output: Tensor, target: Tensor) -> Tensor:
        vgg = self.perceptual
        if vgg.mean.device != output.device or vgg.mean.dtype != output.dtype:
            vgg.to(device=output.device, dtype=output.dtype)
        out_mag = to_complex(output).abs().unsqueeze(1)  # complex abs: gradient 0 (not NaN) at 0
        tgt_mag = to_complex(target).abs().unsqueeze(1)
        peak = tgt_mag.detach().amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(tgt_mag.dtype).tiny)
        return vgg((out_mag / peak).expand(-1, 3, -1, -1), (tgt_mag / peak).expand(-1, 3, -1, -1))

    def forward(self, output: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if output.shape != target.shape or output.dim() != 4 or output.shape[1] != 2:
            raise ValueError(f"expected output and target shaped (B, 2, H, W), got {tuple(output.shape)} "
                             f"and {tuple(target.shape)}")
        output = fft_precision(output)
        target = target.to(output.dtype)
        image = charbonnier(output, target, self.eps)
        spec_out, spec_tgt = magnitude_spectrum(output), magnitude_spectrum(target)
        freq = 0.5 * (charbonnier(spec_out.real, spec_tgt.real, self.eps)
                      + charbonnier(spec_out.imag, spec_tgt.imag, self.eps))
        total = self.alpha * image + self.beta * freq
        if self.perceptual is not None:
            perc = self._perceptual(output, target)
            total = total + self.gamma * perc
        else:
            perc = output.new_zeros(())
        return total, {"image": image.detach(), "freq": freq.detach(), "perceptual": perc.detach()}
