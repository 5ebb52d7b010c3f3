"""bfc, the butterfly compiler for ONNX."""
__version__ = "0.1.0"

from bfc.errors import BfcError  # noqa: E402

__all__ = ["BfcError", "__version__"]
