"""The per-layer task runner of ``plan``: in process, in a local process pool, or on a Dask cluster; resumable.

Once calibration statistics exist, planning one site is a pure function of a small task
(``LayerTask``): the weight array, the site's ``LayerStats`` (Gram matrix + sample rows,
never raw activations), the config, the target's name, the precisions to try, the site's
shared rotation and low-bit bits.  No graph node travels (``Site`` holds ``gs.Node``
references): the worker rebuilds a bare ``Site(weight_name, weight)`` and calls
``bfc.passes.plan.plan_site``; the result (``LayerResult``: the quantized factorization or
low-bit layer, structure, precision, error, reason, note) comes back and the parent
builds the ``LayerPlan``.
Determinism: every task gets ``cfg.seed`` itself (the planner draws from explicitly seeded
generators only, never a global one), results are collected by site index, and a shared
rotation is re-attached to the parent's object after a round trip (the rewrite shares one
``x Q`` per rotation object), so the output bytes do not depend on the worker count, the
engine, or the completion order.
Engines (``Runner``):
  * ``workers == 1``: in process, one task at a time (no pool);
  * ``workers > 1`` (default ``None``: the usable cores, in process when there is less than
    ``POOL_MIN_ELEMENTS`` weight elements to plan or a single task): a
    ``concurrent.futures.ProcessPoolExecutor`` with a forkserver context (spawn where there
    is none), the planner modules preloaded in the server;
  * ``cluster`` (an address, or ``local`` for a ``LocalCluster`` of ``workers`` processes):
    the same task function on Dask distributed (``pip install 'bfc[cluster]'``); each
    task's payload is scattered to the cluster and released after its result.
At most ``INFLIGHT_PER_WORKER`` tasks per worker are in flight: the parent never ships
every weight at once.  Every task runs on one BLAS thread whatever the engine
(``one_blas_thread``): multi-threaded BLAS reductions round differently in the last bit,
which could flip a budget decision between worker counts.
Resume (``WorkFolder``): each finished layer is written atomically to the work folder as
``<key>.pkl``, key = sha256 of the planner's source code, the weight (dtype, shape, bytes),
the statistics' bytes, the config fields that affect planning (``NOT_PLANNING`` are left
out), the target, the precisions, the rotation and bits; a rerun loads finished layers
instead of planning them.  ``cfg.work_dir`` is kept; without it the folder is
``<tempdir>/bfc-work/<hash of every task key>`` and is removed once planning finishes.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

POOL_MIN_ELEMENTS = 1 << 22     # workers=None: fewer weight elements to plan run in process (pool start-up ~1 s)
INFLIGHT_PER_WORKER = 2         # tasks shipped per worker at a time
CONNECT_TIMEOUT = 30            # seconds to reach a Dask scheduler
RECORD_VERSION = 1
NOT_PLANNING = frozenset({       # config fields that do not change one site's plan
    "workers", "cluster", "work_dir", "verify", "strict", "calibration", "calibration_rows", "fix_batch",
    "max_output_error", "include", "exclude", "min_size", "target_size", "distill", "distill_steps",
    "distill_batch", "distill_lr", "distill_match", "distill_layernorm"})
_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class LayerTask:
    index: int                   # the site's position in ``sites``
    key: str                     # the site's weight name
    weight: object               # np.ndarray (K, N)
    stats: object | None         # LayerStats or None
    config: object               # OptimizeConfig
    target: object               # a target name (shipped) or a Target (in process)
    precisions: tuple
    rotation: object | None = None
    bits: tuple = ()
    seed: int = 0
    origin_pid: int = 0          # the process that made the task (not part of the record key)


@dataclass
class LayerResult:
    weights: object | None       # QuantizedFactorization | RotatedLayer | None
    structure: str
    precision: str
    error: float | None
    error_kind: str
    reason: str | None
    note: str | None
    seconds: float = 0.0         # wall time of the planning (the original run's, for a loaded record)
    worker: str = "main"
    resumed: bool = False        # loaded from the work folder


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _worker_id() -> str:
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker
            return f"dask {get_worker().name}"
        except (ImportError, ValueError):
            pass
    return "main" if _IN_MAIN else f"pid {os.getpid()}"


_IN_MAIN = True


def run_task(task: LayerTask) -> LayerResult:
    """Plan one site (in any process): the task function of every engine."""
    from bfc.passes import plan as plan_mod
    from bfc.passes.find_sites import Site
    target = task.target
    if isinstance(target, str):
        from bfc.passes.targets import get_target
        target = get_target(target)
    if task.origin_pid and os.getpid() != task.origin_pid and _IN_MAIN:
        _limit_threads(1)            # a Dask worker process (pool workers are limited by their initializer)
    cfg = task.config if task.config.seed == task.seed else task.config.replace(seed=task.seed)
    t0 = time.perf_counter()
    p = plan_mod.plan_site(Site(task.key, task.weight), cfg, target, task.stats, task.precisions,
                           task.rotation, task.bits)
    return LayerResult(p.weights, p.structure, p.precision, p.error, p.error_kind, p.reason, p.note,
                       time.perf_counter() - t0, _worker_id())


def _limit_threads(n: int) -> None:
    from threadpoolctl import threadpool_limits
    for v in _BLAS_VARS:
        os.environ[v] = str(n)
    threadpool_limits(n)


def _init_worker() -> None:
    """Pool worker: one BLAS thread (as every task everywhere, see ``one_blas_thread``)."""
    global _IN_MAIN
    _IN_MAIN = False
    _limit_threads(1)


@contextmanager
def one_blas_thread():
    """Every task runs on one BLAS thread, wherever it runs: multi-threaded BLAS reductions round
    differently, and a layer error at the last bit can flip a budget decision, so the thread count
    must not depend on the engine or the worker count (threadpoolctl sets it for every BLAS)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        yield


# ---- resume -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of bfc's Python sources (the package and its passes): a record never outlives the code."""
    import bfc
    import bfc.passes
    h = hashlib.sha256()
    roots = [Path(bfc.__file__).resolve().parent] + [Path(p).resolve() for p in bfc.passes.__path__]
    for root in dict.fromkeys(roots):
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Hash a value: numpy arrays by dtype, shape and bytes; containers and dataclasses recursively."""
    import numpy as np
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"nd{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    elif isinstance(obj, enum.Enum):
        h.update(f"en{type(obj).__name__}.{obj.value!r}".encode())
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, Path, np.generic)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (tuple, list)):
        h.update(f"{type(obj).__name__}[{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
        h.update(b"]")
    elif isinstance(obj, dict):
        h.update(f"dict[{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
        h.update(b"]")
    elif dataclasses.is_dataclass(obj):
        h.update(f"dc{type(obj).__module__}.{type(obj).__qualname__}(".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode() + b"=")
            _feed(h, getattr(obj, f.name))
        h.update(b")")
    else:
        h.update(pickle.dumps(obj, protocol=5))


def task_key(task: LayerTask) -> str:
    cfg = task.config
    h = hashlib.sha256(f"bfc-layer-record v{RECORD_VERSION}\0{code_fingerprint()}\0".encode())
    target = task.target if isinstance(task.target, str) else \
        f"{type(task.target).__module__}.{type(task.target).__qualname__}:{task.target.name}"
    _feed(h, {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_PLANNING})
    for part in (target, tuple(task.precisions), task.bits, task.seed, task.weight, task.stats, task.rotation):
        _feed(h, part)
    return h.hexdigest()


class WorkFolder:
    """Finished layers, one pickled ``LayerResult`` per key, written atomically."""

    def __init__(self, path: Path, temporary: bool = False):
        self.path, self.temporary = Path(path), temporary

    def load(self, key: str) -> LayerResult | None:
        f = self.path / f"{key}.pkl"
        try:
            with f.open("rb") as fh:
                res = pickle.load(fh)
        except FileNotFoundError:
            return None
        except Exception:            # a damaged or foreign record: plan the layer again
            return None
        return res if isinstance(res, LayerResult) else None

    def save(self, key: str, res: LayerResult) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".rec-", dir=self.path)
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(dataclasses.replace(res, resumed=False), fh, protocol=5)
            os.replace(tmp, self.path / f"{key}.pkl")
        except OSError:
            pass                     # a full or read-only disk costs resumability, never the run

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def work_folder(cfg, keys) -> WorkFolder:
    if getattr(cfg, "work_dir", None) is not None:
        return WorkFolder(Path(cfg.work_dir))
    h = hashlib.sha256("\0".join(keys).encode()).hexdigest()[:24]
    return WorkFolder(Path(tempfile.gettempdir()) / "bfc-work" / h, temporary=True)


# ---- engines ----------------------------------------------------------------------------------

def _pool_context():
    import multiprocessing as mp
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "bfc.passes.plan", "bfc.passes.layer_runner"])
        return ctx
    return mp.get_context("spawn")


@contextmanager
def _without_main():
    """Start pool workers without re-running the caller's ``__main__`` script in them: the task
    function lives in this module, and a script without an ``if __name__ == "__main__"`` guard would
    otherwise run again in every worker (multiprocessing's spawn/forkserver preparation)."""
    import types
    main = sys.modules.get("__main__")
    env = {v: os.environ.get(v) for v in _BLAS_VARS}
    sys.modules["__main__"] = types.ModuleType("__main__")
    os.environ.update({v: "1" for v in _BLAS_VARS})      # a forkserver started now preloads numpy with 1 thread
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main
        for v, old in env.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def _shipped(task: LayerTask) -> LayerTask:
    """The task as another process gets it: the target by name when the registry has it."""
    t = task.target
    if not isinstance(t, str):
        from bfc.passes.targets import _REGISTRY
        if _REGISTRY.get(getattr(t, "name", None)) is t:
            return dataclasses.replace(task, target=t.name)
    return task


class Runner:
    """Run ``LayerTask``s; ``run(tasks)`` yields (task, LayerResult) in completion order.
    ``engine`` says what ran them: "in process", "process pool (N workers)" or "dask (ADDRESS, N threads)"."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.workers = getattr(cfg, "workers", None)
        self.cluster = getattr(cfg, "cluster", None)
        self.engine = "in process"
        self.folder: WorkFolder | None = None
        self.planned = 0
        self.resumed = 0

    def run(self, tasks):
        tasks = list(tasks)
        keys = {t.index: task_key(t) for t in tasks}
        self.folder = work_folder(self.cfg, [keys[t.index] for t in tasks])
        try:
            todo = []
            for t in tasks:
                rec = self.folder.load(keys[t.index])
                if rec is None:
                    todo.append(t)
                    continue
                self.resumed += 1
                yield t, self._attach(t, dataclasses.replace(rec, resumed=True))
            for t, res in self._engine(todo):
                self.planned += 1
                self.folder.save(keys[t.index], res)
                yield t, self._attach(t, res)
        except GeneratorExit:            # the caller has what it needs (e.g. the target size is reached)
            if self.folder.temporary:
                self.folder.remove()
            raise
        if self.folder.temporary:        # planning finished; a killed or failed run keeps the folder to resume
            self.folder.remove()

    @staticmethod
    def _attach(task: LayerTask, res: LayerResult) -> LayerResult:
        """Give a rotated layer back the parent's rotation object (shared by the layers reading one tensor)."""
        w = res.weights
        if task.rotation is not None and getattr(w, "rotation", None) is not None and w.rotation is not task.rotation:
            res = dataclasses.replace(res, weights=dataclasses.replace(w, rotation=task.rotation))
        return res

    def _engine(self, tasks):
        if not tasks:
            return
        if self.cluster:
            yield from self._dask(tasks)
            return
        n = self.workers if self.workers is not None else cpu_count()
        work = sum(int(t.weight.size) for t in tasks)
        if n <= 1 or len(tasks) == 1 or (self.workers is None and work < POOL_MIN_ELEMENTS):
            for t in tasks:
                with one_blas_thread():
                    res = run_task(t)
                yield t, res
            return
        yield from self._pool(tasks, min(n, len(tasks)))

    def _pool(self, tasks, n):
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        self.engine = f"process pool ({n} workers)"
        ex = ProcessPoolExecutor(max_workers=n, mp_context=_pool_context(), initializer=_init_worker)
        queue = iter(tasks)
        running = {}
        try:
            with _without_main():              # the workers start here (one per submit, up to n)
                for t in queue:
                    running[ex.submit(run_task, _shipped(t))] = t
                    if len(running) >= INFLIGHT_PER_WORKER * n:
                        break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    t = running.pop(fut)
                    res = fut.result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        running[ex.submit(run_task, _shipped(nxt))] = nxt
                    yield t, res
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    def _dask(self, tasks):
        try:
            from distributed import Client, LocalCluster, wait
        except ImportError:
            from bfc.errors import ConfigError
            raise ConfigError("cluster needs Dask distributed: pip install 'bfc[cluster]' (or "
                              "pip install 'dask[distributed]') on this machine and on the cluster's workers") from None
        local = None
        if self.cluster == "local":
            n = self.workers if self.workers is not None else cpu_count()
            local = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(local)
        else:
            try:
                client = Client(self.cluster, timeout=CONNECT_TIMEOUT)
            except OSError as e:
                from bfc.errors import ConfigError
                raise ConfigError(f"cannot reach the Dask scheduler at {self.cluster} ({e}); start one "
                                  "(dask scheduler) or check --cluster") from None
        running = {}
        try:
            slots = max(1, sum(client.nthreads().values()))
            self.engine = f"dask ({self.cluster}, {slots} threads)"
            queue = iter(tasks)

            def submit(t):
                data = client.scatter(dataclasses.replace(_shipped(t), origin_pid=os.getpid()), hash=False)
                running[client.submit(run_task, data, pure=False)] = (t, data)

            for t in queue:
                submit(t)
                if len(running) >= INFLIGHT_PER_WORKER * slots:
                    break
            with one_blas_thread():                # workers that are threads of this process
                while running:
                    done = wait(list(running), return_when="FIRST_COMPLETED").done
                    for fut in done:
                        t, data = running.pop(fut)
                        res = fut.result()
                        fut.release()
                        data.release()
                        nxt = next(queue, None)
                        if nxt is not None:
                            submit(nxt)
                        yield t, res
        finally:
            for fut, (_t, data) in list(running.items()):
                fut.cancel()
                data.release()
            client.close()
            if local is not None:
                local.close()
