"""kronify's model zoo: dense MRI reconstruction networks and their Kronecker versions.

`zoo.create(name, **overrides)` builds a model; `zoo.names()` lists the names. `kron_<name>` is
`kronify.convert(zoo.create(name), **KRON_SETTINGS)`, never a hand-written copy; `zoo.create_kron`
also returns the ConversionReport. Every model maps (B, 2, H, W) (real, imag) to the same shape for any
H×W and has `needs_kspace` (True for MoDL, whose forward is (x, mask, kspace)).

The paper's own U-Net is `unet_ddpm` (DDPM-style; fastMRI's U-Net is `unet`). `zoo.summary` prints parameter and
FLOP counts of every model; `zoo.paper_reference` sets our counts of the paper's official configurations beside
its Table 1; `zoo.build` builds a preset's model for kronify.mri.experiments (the recipes' model factory).
"""

from zoo.registry import create, create_kron, dense_names, example_inputs, kron_settings, names, variant_name

__all__ = ["create", "create_kron", "dense_names", "example_inputs", "kron_settings", "names", "variant_name"]
