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


Event = StageStarted | SitesFound | LayerPlanned
