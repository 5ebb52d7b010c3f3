"""bfc, the butterfly compiler for ONNX.

``bfc.passes`` is the top-level ``passes/`` folder of the repository: ``bfc/passes`` is a link to
it, so a checkout, an editable install and the wheel (which copies the linked files) all import it
the same way.
"""
__version__ = "0.1.0"

from bfc.api import optimize, save
from bfc.config import OptimizeConfig
from bfc.errors import BfcError

__all__ = ["BfcError", "OptimizeConfig", "optimize", "save", "__version__"]
