"""kronify: make any PyTorch network parameter-efficient with Kronecker (PHM) weights, W = Σ_i A_i ⊗ F_i."""

# Importing each function after its submodule rebinds e.g. `kronify.convert` (the attribute) from
# the submodule to the function.
from kronify.calibration.config import CalibrationConfig
from kronify.config import KronConfig
from kronify.convert import convert, is_kron
from kronify.distill import DistillResult, distill
from kronify.io import from_pretrained, load, save
from kronify.kron import kron_weight
from kronify.merge import merge
from kronify.nearest import nearest_kronecker
from kronify.parametrization import KronParametrization, kron_param_count
from kronify.report import ConversionReport

__version__ = "0.1.0"

__all__ = ["CalibrationConfig", "ConversionReport", "DistillResult", "KronConfig", "KronParametrization", "convert",
           "distill", "from_pretrained", "is_kron", "kron_param_count", "kron_weight", "load", "merge",
           "nearest_kronecker", "save"]
