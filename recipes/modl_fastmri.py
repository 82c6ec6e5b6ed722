"""Train and evaluate MoDL (unrolled, data consistency) and the Kronecker MoDL on fastMRI single-coil knee (or the demo data).

    python recipes/modl_fastmri.py                                 # demo data, CPU, minutes
    python recipes/modl_fastmri.py --kron-n 0 2 --acceleration 8   # dense and Kronecker at 8x
    python recipes/modl_fastmri.py --data-path /data/fastmri --preset paper --devices 4 --strategy ddp

All flags: `--help`; the shared command line is recipes/_common.py.
"""

import sys

from _common import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("modl", description=__doc__.split("\n\n")[0]))
