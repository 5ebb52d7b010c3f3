"""The pass contract: what a graph pass requires, what it ensures, whether it works in place.

A pass is a small object with a ``contract`` and a ``run(state) -> PassResult``.  The
pipeline state carries *facts* (names such as ``"sites"`` or ``"plans"``); calling a
pass checks that its required facts hold, runs it and records the facts it ensures.
``in_place`` passes modify ``state.graph``; the others only add new state (they never
modify ``state.model``, the input).  A ``PassResult`` says whether the model changed
and, for every site the pass left alone, why (the onnx_ir ``PassBase``/``PassResult``
idea, written for bfc's pipeline).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Contract:
    requires: frozenset[str]
    ensures: frozenset[str]
    in_place: bool

    @classmethod
    def of(cls, requires=(), ensures=(), in_place=False) -> "Contract":
        return cls(frozenset(requires), frozenset(ensures), in_place)


@dataclass
class PassResult:
    changed: bool
    skipped: dict[str, str] = field(default_factory=dict)    # site name -> why it was not rewritten


class ContractError(RuntimeError):
    """A pass was called on a state that lacks the facts it requires (a bug in the pipeline)."""


class GraphPass:
    """Base class: subclasses set ``contract`` and implement ``run``."""
    contract: Contract = Contract.of()

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, state) -> PassResult:
        raise NotImplementedError

    def __call__(self, state) -> PassResult:
        missing = self.contract.requires - state.facts
        if missing:
            raise ContractError(f"pass {self.name} requires {sorted(missing)}, which no earlier pass ensured")
        result = self.run(state)
        state.facts |= self.contract.ensures
        return result
