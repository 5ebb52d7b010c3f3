"""Kronecker-sparse patterns, chains and the canonical factor layout (see ``pattern``)."""
from bfc.ks.chain import (
                          Chain,
                          butterfly_chain,
                          chain_from_blocks,
                          chainable_chain,
                          dense_chain,
                          monarch_chain,
                          parse_chain,
                          prime_factors,
                          split_factors,
)
from bfc.ks.pattern import KSPattern

__all__ = ["KSPattern", "Chain", "butterfly_chain", "monarch_chain", "chainable_chain",
           "chain_from_blocks", "dense_chain", "parse_chain", "prime_factors", "split_factors"]
