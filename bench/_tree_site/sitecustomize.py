# bench helper: import bfc from $BFC_TREE (a snapshot), not through the editable install's finder
import os, sys
_tree = os.environ.get("BFC_TREE")
if _tree:
    sys.meta_path[:] = [f for f in sys.meta_path if "skbc" not in type(f).__module__ and "Redirecting" not in type(f).__name__]
    if _tree not in sys.path:
        sys.path.insert(0, _tree)
