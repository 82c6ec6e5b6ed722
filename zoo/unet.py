"""U-Net: the fastMRI baseline `fastmri.models.Unet`, reused as is, with 2 channels (real, imag) in and out.

fastmri's Unet already handles any H×W: after each transposed conv it reflect-pads the odd row/column
to match the skip, so no wrapper padding is needed (tested on 100×84). Its InstanceNorm layers have no
parameters; its Conv2d and ConvTranspose2d layers are what `kronify.convert` turns into Kronecker layers.
"""

from __future__ import annotations

from fastmri.models import Unet as _FastMRIUnet

# The Kronecker version (`kron_unet`): every Conv2d / ConvTranspose2d at n = 2; nothing kept dense
# (the 2-channel first and last convs divide by 2).
KRON_SETTINGS: dict = dict(n=2, exclude=None, overrides=None)


class Unet(_FastMRIUnet):
    """`fastmri.models.Unet` with the zoo attribute `needs_kspace` (False: image in, image out)."""

    needs_kspace = False


def unet(chans: int = 32, num_pool_layers: int = 4, drop_prob: float = 0.0, in_chans: int = 2,
         out_chans: int = 2) -> Unet:
    """The fastMRI U-Net baseline (chans 32, 4 pooling levels): about 7.76 M parameters at 2 channels."""
    return Unet(in_chans=in_chans, out_chans=out_chans, chans=chans, num_pool_layers=num_pool_layers,
                drop_prob=drop_prob)


def unet_demo(chans: int = 8, num_pool_layers: int = 4, **kwargs) -> Unet:
    """A small U-Net (chans 8) for CPU demos and tests."""
    return unet(chans=chans, num_pool_layers=num_pool_layers, **kwargs)
