"""bfc, the butterfly compiler for ONNX."""
__version__ = "0.1.0"

from bfc.errors import BfcError  # noqa: E402


def __getattr__(name):   # lazy: ``import bfc`` stays light (no onnxruntime/graphsurgeon until used)
    if name == "optimize":
        from bfc.api import optimize
        return optimize
    if name == "OptimizeConfig":
        from bfc.config import OptimizeConfig
        return OptimizeConfig
    raise AttributeError(f"module 'bfc' has no attribute {name!r}")


__all__ = ["BfcError", "OptimizeConfig", "optimize", "__version__"]
