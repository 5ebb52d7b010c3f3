"""bfc, the butterfly compiler for ONNX."""
__version__ = "0.1.0"

from bfc.errors import BfcError  # noqa: E402
from bfc.config import OptimizeConfig  # noqa: E402
from bfc.api import optimize  # noqa: E402

__all__ = ["BfcError", "OptimizeConfig", "optimize", "__version__"]
