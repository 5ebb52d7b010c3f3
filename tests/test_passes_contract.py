"""Pass contracts, the one pipeline, and one-way dependencies (core <- passes <- front door)."""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bfc
from bfc.cli import main
from bfc.config import OptimizeConfig
from bfc.passes.pipeline import run_passes

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)
CFG = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, verify=False)


def two_layer_model():
    nodes = [h.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), h.make_node("Relu", ["h"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["B", 32])],
                     [nh.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "W1"),
                      nh.from_array(RNG.standard_normal((64, 32)).astype(np.float32), "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def test_stages_return_frozen_products_and_never_touch_the_input():
    m = two_layer_model()
    before = m.SerializeToString()
    done = run_passes(m, CFG)
    assert m.SerializeToString() == before and done.output is not m
    assert all(p.rewritten for p in done.plans)
    for product in (done, done.loaded, done.rewritten, *done.plans):
        assert dataclasses.is_dataclass(product)
        field = dataclasses.fields(product)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(product, field, None)


def test_skipped_sites_carry_reasons():
    done = run_passes(two_layer_model(), CFG.replace(exclude=("mm2",)))
    reasons = {p.site.name: p.reason for p in done.plans if not p.rewritten}
    assert reasons == {"mm2": "matched by --exclude mm2"}
    assert sum(p.rewritten for p in done.plans) == 1


def test_pipeline_reads_top_to_bottom():
    """``optimize`` calls every stage once, in order, each a function of the products before it."""
    tree = ast.parse((ROOT / "passes" / "pipeline.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "optimize")
    calls = [c.func.id for c in sorted((c for c in ast.walk(fn) if isinstance(c, ast.Call)
                                        and isinstance(c.func, ast.Name)), key=lambda c: (c.lineno, c.col_offset))]
    stages = ["load", "normalize", "fuse_stage", "fold_head_rotations", "find_model_sites", "calibrate", "plan_layers",
              "guard", "distill",
              "rewrite_model", "save", "verify_result"]
    assert [c for c in calls if c in stages] == stages


def test_cli_and_api_write_identical_bytes(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(two_layer_model().SerializeToString())
    assert main(["optimize", str(src), "-o", str(tmp_path / "cli.onnx"), "--structure", "monarch", "--rank", "2",
                 "--no-max-error", "--no-max-output-error", "--min-size", "0", "-q"]) == 0
    model, report = bfc.optimize(src, CFG.replace(verify=True))
    bfc.save(model, tmp_path / "api.onnx")
    assert (tmp_path / "cli.onnx").read_bytes() == (tmp_path / "api.onnx").read_bytes()
    assert report.verified_on == "random" and 0 < report.outputs[0].rel_error < 1.0   # random weights: lossy


def test_events_are_typed():
    from bfc.passes.events import LayerPlanned, SitesFound, StageStarted
    events = []
    bfc.optimize(two_layer_model(), CFG, on_event=events.append)
    assert [e.stage for e in events if isinstance(e, StageStarted)][:4] == ["load", "normalize", "fuse", "sites"]
    assert [e for e in events if isinstance(e, SitesFound)] == [SitesFound(2, 2)]
    assert [e.done for e in events if isinstance(e, LayerPlanned)] == [1, 2]


CORE = ("bfc/ks", "bfc/factorize", "bfc/quant", "bfc/lowbit", "bfc/config.py", "bfc/errors.py", "bfc/ops",
        "bfc/runtime.py", "bfc/report.py", "bfc/reconstruct.py")
FRONT = ("bfc.api", "bfc.cli", "bfc.study", "bfc.torch")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("layer,forbidden", [(CORE, ("bfc.passes",) + FRONT), (("passes",), FRONT)])
def test_dependencies_point_one_way(layer, forbidden):
    files = [f for part in layer for f in ((ROOT / part).rglob("*.py") if (ROOT / part).is_dir() else [ROOT / part])]
    assert files
    bad = [(str(f.relative_to(ROOT)), mod) for f in files for mod in _imports(f)
           if any(mod == x or mod.startswith(x + ".") for x in forbidden)]
    assert bad == []


OPTIONAL = ("torch", "dask", "distributed", "matplotlib", "tokenizers", "gensim", "transformers")


def _module_name(f: Path) -> str:
    rel = f.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":
        parts = ["bfc", "passes"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources():
    return sorted(f for d in ("bfc", "passes") for f in (ROOT / d).rglob("*.py"))


def _top_level_imports(tree) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_function_level_import_between_bfc_modules():
    """Imports of bfc modules sit at the top of each module; only a module that needs an optional heavy
    package (it imports torch, dask, matplotlib, ... at its top) may be imported lazily."""
    trees = {_module_name(f): ast.parse(f.read_text()) for f in _sources()}
    optional = {name for name, t in trees.items()
                if any(m.split(".")[0] in OPTIONAL for m in _top_level_imports(t))}
    bad = []
    for name, tree in trees.items():
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            inner = [m for m in mods if m == "bfc" or m.startswith("bfc.")]
            if inner and not any(m in optional for m in inner):
                bad.append((name, node.lineno, inner[0]))
    assert bad == []


def test_no_import_cycle_between_bfc_modules():
    trees = {_module_name(f): ast.parse(f.read_text()) for f in _sources()}
    graph = {n: {m for m in _top_level_imports(t) if m in trees and m != n} for n, t in trees.items()}
    for n in graph:                       # a package's __init__ is not an edge of its submodules' imports
        graph[n] = {m for m in graph[n] if not n.startswith(m + ".")}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert cycles == []
