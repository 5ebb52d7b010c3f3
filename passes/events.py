"""Typed progress events of the pipeline (the CLI draws its progress bar from them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageStarted:
    stage: str                 # load | sites | calibrate | plan | rewrite | export | save | verify
    detail: str | None = None


@dataclass(frozen=True)
class SitesFound:
    eligible: int
    total: int


@dataclass(frozen=True)
class LayerPlanned:
    layer: str
    rewritten: bool
    done: int                  # layers planned so far
    total: int
    seconds: float | None = None   # wall time of this layer's planning (None: not planned, e.g. excluded)
    worker: str | None = None      # who planned it: main, pid N (process pool), dask NAME
    elapsed: float | None = None   # seconds since planning started
    eta: float | None = None       # seconds left, from the weight elements planned so far
    resumed: bool = False          # loaded from the work folder
    cpu_seconds: float | None = None   # CPU time of the planning thread (wall time minus waiting for a core)


Event = StageStarted | SitesFound | LayerPlanned
