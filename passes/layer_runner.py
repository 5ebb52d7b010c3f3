"""The per-layer task runner of ``plan``: in process, in a local process pool, or on a Dask cluster; resumable.

Once calibration statistics exist, planning one site is a pure function of a small task
(``LayerTask``): the weight array, the site's ``LayerStats`` (Gram matrix + sample rows,
never raw activations), the config, the target's name, the precisions to try, the site's
shared rotation and low-bit bits.  No graph node travels (``Site`` holds ``gs.Node``
references): the worker rebuilds a bare ``Site(weight_name, weight)`` and calls
``bfc.passes.candidates.plan_site``; the result (``LayerResult``: the quantized factorization or
low-bit layer, structure, precision, error, reason, note) comes back and the parent
builds the ``LayerPlan``.
Determinism: every task gets ``cfg.seed`` itself (the planner draws from explicitly seeded
generators only, never a global one), results are collected by site index, and a shared
rotation is re-attached to the parent's object after a round trip (the rewrite shares one
``x Q`` per rotation object), so the output bytes do not depend on the worker count, the
engine, or the completion order.
Engines (``Runner``):
  * ``workers == 1``: in process, one task at a time (no pool);
  * ``workers = N > 1`` (default ``None``: the usable cores, in process when there is less than
    ``POOL_MIN_ELEMENTS`` weight elements to plan or a single task): N planners, this process and
    a ``concurrent.futures.ProcessPoolExecutor`` of N - 1 processes on a forkserver (spawn where
    there is none), the planner modules preloaded in the server.  This process plans too: on N
    cores no core idles while the pool starts, and the layers it plans are never pickled;
  * ``cluster="local"``: the same with a Dask ``LocalCluster`` of N - 1 single-threaded worker
    processes in place of the pool (started in a feeder thread while this process plans; N = 1: one
    Dask worker); ``cluster=ADDRESS``: the scheduler's workers plan every layer
    (``pip install 'bfc[cluster]'``).  Each Dask task's payload is scattered to the cluster and
    released after its result.
Tasks are handed out largest first (``plan_sites`` orders them) to the next free planner (a
helper also holds up to ``INFLIGHT_PER_WORKER`` queued), so the last layers to finish are small.
Every result carries the planning thread's CPU time (``cpu_seconds``) beside its wall time.
At most ``INFLIGHT_PER_WORKER`` tasks per worker are in flight: the parent never ships
every weight at once.  Every task runs on one BLAS thread whatever the engine
(``one_blas_thread``): multi-threaded BLAS reductions round differently in the last bit,
which could flip a budget decision between worker counts.
Resume (``WorkFolder``): each finished layer is written atomically to the work folder as
``<key>.pkl``, key = sha256 of the planner's source code, the weight (dtype, shape, bytes),
the statistics' bytes, the config fields that affect planning (``NOT_PLANNING`` are left
out), the target, the precisions, the rotation and bits; a rerun loads finished layers
instead of planning them.  ``cfg.schedule.work_dir`` is kept; without it the folder is
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

import numpy as np

import bfc
import bfc.passes
from bfc.errors import ConfigError
from bfc.passes.candidates import layer_candidates, plan_site
from bfc.passes.find_sites import Site, SiteNode
from bfc.passes.targets import get_target, is_registered

POOL_MIN_ELEMENTS = 1 << 22     # workers=None: fewer weight elements to plan run in process (pool start-up ~1 s)
INFLIGHT_PER_WORKER = 2         # tasks shipped per worker at a time
CONNECT_TIMEOUT = 30            # seconds to reach a Dask scheduler
RECORD_VERSION = 1
NOT_PLANNING = frozenset({       # config fields that do not change one site's plan
    "workers", "cluster", "work_dir", "verify", "strict", "calibration", "calibration_rows", "fix_batch",
    "max_output_error", "include", "exclude", "min_size", "target_size", "distill", "distill_steps",
    "distill_batch", "distill_lr", "distill_match", "distill_layernorm", "distill_rotation", "distill_headroom",
    "distill_blockwise_steps", "max_metric_drop", "fuse", "objective"})
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
    opset: int                   # the model's opset (candidates the target cannot emit there are dropped)
    rotation: object | None = None
    bits: tuple = ()
    seed: int = 0
    origin_pid: int = 0          # the process that made the task (not part of the record key)
    mode: str = "plan"           # "plan": plan_site's choice; "candidates": every candidate (the allocator)
    op: str = "MatMul"           # the site's node type (Gather: an embedding table)
    prerotated: bool = False     # the site's input arrives rotated (bfc.passes.head_rotation): low-bit, no Q


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
    cpu_seconds: float = 0.0     # CPU time of the planning thread (one BLAS thread: the whole computation)
    candidates: tuple = ()       # mode "candidates": the site's Candidates (bfc.passes.candidates)


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
    target = task.target
    if isinstance(target, str):
        target = get_target(target)
    if task.origin_pid and os.getpid() != task.origin_pid and _IN_MAIN:
        _limit_threads(1)            # a Dask worker process (pool workers are limited by their initializer)
    cfg = task.config if task.config.seed == task.seed else task.config.replace(seed=task.seed)
    t0, c0 = time.perf_counter(), time.thread_time()
    if task.mode == "candidates":
        cands = layer_candidates(Site(task.key, task.weight, [SiteNode(task.key, task.op)]), cfg, target, task.stats,
                                 task.rotation, opset=task.opset, prerotated=task.prerotated)
        return LayerResult(None, "allocated", "-", None, "output", None, None, time.perf_counter() - t0,
                           _worker_id(), cpu_seconds=time.thread_time() - c0, candidates=cands)
    p = plan_site(Site(task.key, task.weight), cfg, target, task.stats, task.precisions,
                  task.rotation, task.bits)
    return LayerResult(p.weights, p.structure, p.precision, p.error, p.error_kind, p.reason, p.note,
                       time.perf_counter() - t0, _worker_id(), cpu_seconds=time.thread_time() - c0)


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
    h = hashlib.sha256()
    roots = [Path(bfc.__file__).resolve().parent] + [Path(p).resolve() for p in bfc.passes.__path__]
    for root in dict.fromkeys(roots):
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Hash a value: numpy arrays by dtype, shape and bytes; containers and dataclasses recursively."""
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
    _feed(h, {k: v for k, v in cfg.flat().items() if k not in NOT_PLANNING})
    for part in (target, tuple(task.precisions), task.bits, task.seed, task.weight, task.stats, task.rotation,
                 task.mode, task.op, task.opset, task.prerotated):
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
        except Exception:  # noqa: BLE001 - a damaged or foreign record: plan the layer again
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
    if cfg.schedule.work_dir is not None:
        return WorkFolder(Path(cfg.schedule.work_dir))
    h = hashlib.sha256("\0".join(keys).encode()).hexdigest()[:24]
    return WorkFolder(Path(tempfile.gettempdir()) / "bfc-work" / h, temporary=True)


# ---- engines ----------------------------------------------------------------------------------

def _pool_context():
    import multiprocessing as mp
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "bfc.passes.candidates", "bfc.passes.layer_runner"])
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
    if not isinstance(t, str) and is_registered(t):
        return dataclasses.replace(task, target=t.name)
    return task


class Runner:
    """Run ``LayerTask``s; ``run(tasks)`` yields (task, LayerResult) in completion order.
    ``engine`` says what ran them: "in process", "process pool (N workers)" or "dask (ADDRESS, N threads)"."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.workers = cfg.schedule.workers
        self.cluster = cfg.schedule.cluster
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
        """Give a rotated layer (and every rotated candidate) back the parent's rotation object, shared by the
        layers reading one tensor: the rewrite emits one x Q per rotation object."""
        if task.rotation is None:
            return res

        def own(form):
            r = getattr(form, "rotation", None)
            return dataclasses.replace(form, rotation=task.rotation) if r is not None and r is not task.rotation \
                else form
        cands = tuple(dataclasses.replace(c, form=own(c.form)) if c.form is not None else c for c in res.candidates)
        return dataclasses.replace(res, weights=None if res.weights is None else own(res.weights), candidates=cands)

    def _engine(self, tasks):
        if not tasks:
            return
        if self.cluster and self.cluster != "local":
            yield from self._remote(tasks)
            return
        n = self.workers if self.workers is not None else cpu_count()
        work = sum(int(t.weight.size) for t in tasks)
        if self.cluster == "local":
            _require_distributed()
            if n <= 1:                       # one planner: a single Dask worker (main stays the client)
                yield from self._shared(tasks, _DaskLocal(1), main_plans=False)
            else:
                yield from self._shared(tasks, _DaskLocal(n - 1), main_plans=True)
            return
        if n <= 1 or len(tasks) == 1 or (self.workers is None and work < POOL_MIN_ELEMENTS):
            for t in tasks:
                with one_blas_thread():
                    res = run_task(t)
                yield t, res
            return
        yield from self._shared(tasks, _Pool(min(n, len(tasks)) - 1), main_plans=True)

    def _shared(self, tasks, backend, main_plans: bool):
        """Plan ``tasks`` (largest first) with ``backend``'s helpers and, when ``main_plans``, this
        process as one more planner: N planners are this process and N - 1 helpers, so on N cores
        no core waits while the helpers start (a pool's forkserver, a LocalCluster's scheduler and
        workers start in a feeder thread while this process plans the first layer), and half of
        the layers (on 2 cores) never travel.  The feeder thread keeps ``INFLIGHT_PER_WORKER``
        tasks per helper in flight and hands their results over a queue; this thread takes the
        next task itself whenever it is free.  Yields (task, LayerResult) in completion order."""
        import queue as _queue
        import threading
        from collections import deque

        todo = deque(tasks)
        lock = threading.Lock()
        results = _queue.Queue()
        stop = threading.Event()
        done_marker = object()
        self.engine = backend.label(main_plans)

        def take():
            with lock:
                return todo.popleft() if todo and not stop.is_set() else None

        def feeder():
            running = {}
            try:
                backend.start()
                self.engine = backend.label(main_plans)
                cap = INFLIGHT_PER_WORKER * backend.slots()
                while not stop.is_set():
                    while len(running) < cap:
                        t = take()
                        if t is None:
                            break
                        running[backend.submit(t)] = t
                    if not running:
                        break
                    for fut in backend.wait_any(list(running)):
                        t = running.pop(fut)
                        results.put((t, backend.result(fut), None))
            except BaseException as e:          # noqa: BLE001 - handed to the planning thread
                results.put((None, None, e))
            finally:
                try:
                    backend.close(running)
                finally:
                    results.put(done_marker)

        th = threading.Thread(target=feeder, name="bfc-layer-feeder", daemon=True)
        if backend.start_here:
            backend.start()
        th.start()
        left = len(tasks)
        feeder_done = False
        try:
            while left:
                item = None
                try:                          # finished helper tasks first; block only with nothing to plan here
                    item = results.get_nowait()
                except _queue.Empty:
                    t = take() if main_plans or feeder_done else None
                    if t is not None:
                        with one_blas_thread():
                            res = run_task(t)
                        left -= 1
                        yield t, res
                        continue
                    item = results.get()
                if item is done_marker:
                    feeder_done = True
                    if left and not todo:
                        raise RuntimeError("layer runner: the helpers stopped with layers unplanned")
                    continue
                t, res, err = item
                if err is not None:
                    raise err
                left -= 1
                yield t, res
        finally:
            stop.set()
            with lock:
                todo.clear()
            th.join()

    def _remote(self, tasks):
        """A Dask scheduler at ``self.cluster``: every task runs on the cluster's workers."""
        from distributed import Client, wait
        _require_distributed()
        try:
            client = Client(self.cluster, timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise ConfigError(f"cannot reach the Dask scheduler at {self.cluster} ({e}); start one "
                              "(dask scheduler) or check --cluster") from None
        running = {}
        try:
            slots = max(1, sum(client.nthreads().values()))
            self.engine = f"dask ({self.cluster}, {slots} threads)"
            queue = iter(tasks)

            def submit(t):
                fut, data = _dask_submit(client, t)
                running[fut] = (t, data)

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


def _require_distributed():
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError("cluster needs Dask distributed: pip install 'bfc[cluster]' (or "
                          "pip install 'dask[distributed]') on this machine and on the cluster's workers") from None


def _dask_submit(client, t):
    """Scatter the task's payload (weight, statistics) to the cluster, then run ``run_task`` on it."""
    data = client.scatter(dataclasses.replace(_shipped(t), origin_pid=os.getpid()), hash=False)
    return client.submit(run_task, data, pure=False), data


class _Pool:
    """``k`` helper processes: a ``ProcessPoolExecutor`` on a forkserver (spawn where there is none)
    with the planner preloaded; started in the planning thread (the forkserver is forked from it)."""
    start_here = True

    def __init__(self, k: int):
        self.k, self.ex = k, None

    def label(self, main_plans: bool) -> str:
        return f"process pool ({self.k + 1} workers: this process and {self.k} pool processes)"

    def start(self):
        if self.ex is not None:
            return
        from concurrent.futures import ProcessPoolExecutor
        with _without_main():
            self.ex = ProcessPoolExecutor(max_workers=self.k, mp_context=_pool_context(), initializer=_init_worker)
            for f in [self.ex.submit(_warm) for _ in range(self.k)]:     # the helpers start now, not at the first task
                f.add_done_callback(lambda _f: None)

    def slots(self) -> int:
        return self.k

    def submit(self, t):
        return self.ex.submit(run_task, _shipped(t))

    @staticmethod
    def wait_any(futs):
        from concurrent.futures import FIRST_COMPLETED, wait
        return wait(futs, return_when=FIRST_COMPLETED).done

    @staticmethod
    def result(fut):
        return fut.result()

    def close(self, running):
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)


def _warm() -> int:
    return os.getpid()


class _DaskLocal:
    """A Dask ``LocalCluster`` of ``k`` single-threaded worker processes (started in the feeder
    thread, so its start-up overlaps this process's planning)."""
    start_here = False

    def __init__(self, k: int):
        self.k, self.cluster, self.client, self.data = k, None, None, {}

    def label(self, main_plans: bool) -> str:
        if main_plans:
            return f"dask (local, {self.k + 1} planners: this process and {self.k} worker processes)"
        return f"dask (local, {self.k} worker process{'es' if self.k > 1 else ''})"

    def start(self):
        import dask
        from distributed import Client, LocalCluster
        # the workers' statistical profiler samples the planning thread every 10 ms: nobody reads it here
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            self.cluster = LocalCluster(n_workers=self.k, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
        self.client = Client(self.cluster)

    def slots(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def submit(self, t):
        fut, data = _dask_submit(self.client, t)
        self.data[fut.key] = data
        return fut

    @staticmethod
    def wait_any(futs):
        from distributed import wait
        return wait(futs, return_when="FIRST_COMPLETED").done

    def result(self, fut):
        res = fut.result()
        fut.release()
        self.data.pop(fut.key).release()
        return res

    def close(self, running):
        for fut in list(running):
            fut.cancel()
        for d in self.data.values():
            d.release()
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
