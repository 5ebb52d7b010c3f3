"""Shared benchmark helpers: machine line, result files, and assembling BENCHMARKS.md."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
ORDER = ["factorize", "quant", "optimize", "runtime", "minilm", "study"]
TITLES = {"factorize": "Factorization", "quant": "Quantization", "optimize": "bfc optimize",
          "runtime": "Native KSMatMul kernels", "minilm": "MiniLM-L6 end to end", "study": "Study"}


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    import onnxruntime
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, {datetime.date.today().isoformat()}")


def write_result(name: str, title: str, command: str, body: str) -> Path:
    """Write bench/results/NAME.md and rebuild BENCHMARKS.md from every result file."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\nCommand: `{command}`  \nMachine: {machine_line()}\n\n{body.strip()}\n")
    assemble()
    return path


def _section(path: Path) -> str:
    """A result file as a BENCHMARKS.md section: headings one level down, a title if it has none."""
    lines = [("#" + ln) if ln.startswith("#") else ln for ln in path.read_text().splitlines()]
    if not lines or not lines[0].startswith("## "):
        lines = [f"## {TITLES.get(path.stem, path.stem)}", ""] + lines
    return "\n".join(lines) + "\n"


def assemble() -> Path:
    parts = ["# bfc benchmarks\n\nEach section is produced by the command it names (results in `bench/results/`);"
             " ratios are measured side by side in one run.\n"]
    files = sorted(RESULTS.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    parts += [_section(p) for p in files]
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    return out


def load_average() -> str:
    """The 1/5/15-minute load average as "a / b / c" (or "n/a" where the OS has none)."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


if __name__ == "__main__":
    print(assemble())
