"""Train and evaluate U-Net (fastMRI's baseline) and the Kronecker U-Net on fastMRI single-coil knee (or the demo data).

    python recipes/unet_fastmri.py                                 # demo data, CPU, minutes
    python recipes/unet_fastmri.py --kron-n 0 2 --acceleration 8   # dense and Kronecker at 8x
    python recipes/unet_fastmri.py --data-path /data/fastmri --preset paper --devices 4 --strategy ddp

All flags: `--help`; the shared command line is recipes/_common.py.
"""

import sys

from _common import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("unet", description=__doc__.split("\n\n")[0]))
