"""bfc, the butterfly compiler for ONNX."""
__version__ = "0.1.0"

from bfc.errors import BfcError  # noqa: E402


def _source_checkout_passes() -> None:
    """In a source checkout (no install) the graph passes live in the top-level ``passes/`` folder,
    which the wheel installs as ``bfc/passes``: make ``import bfc.passes`` find it there too."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parent / "passes" / "__init__.py"
    if "bfc.passes" in sys.modules or (here / "passes").is_dir() or not src.is_file():
        return
    if importlib.util.find_spec("bfc.passes") is not None:     # an editable install maps it already
        return
    spec = importlib.util.spec_from_file_location("bfc.passes", src, submodule_search_locations=[str(src.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bfc.passes"] = module
    spec.loader.exec_module(module)
    globals()["passes"] = module      # as the import system does for a submodule: bfc.passes works


_source_checkout_passes()


def __getattr__(name):   # lazy: ``import bfc`` stays light (no onnxruntime/graphsurgeon until used)
    if name in ("optimize", "save"):
        from bfc import api
        return getattr(api, name)
    if name == "OptimizeConfig":
        from bfc.config import OptimizeConfig
        return OptimizeConfig
    raise AttributeError(f"module 'bfc' has no attribute {name!r}")


__all__ = ["BfcError", "OptimizeConfig", "optimize", "save", "__version__"]
