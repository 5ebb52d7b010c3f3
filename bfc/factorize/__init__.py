"""Factorization of dense weights into Kronecker-sparse chains (see ``hierarchical``)."""
from bfc.factorize.calibrated import activation_gram, relative_error, weighted_error
from bfc.factorize.core import factorize
from bfc.factorize.perm import bitrev_perm, candidate_perms, stride_perm
from bfc.factorize.result import KSFactorization, inverse_perm
from bfc.factorize.select import STRUCTURES, candidates, chain_for, cheapest

__all__ = ["factorize", "KSFactorization", "chain_for", "cheapest", "candidates", "STRUCTURES",
           "bitrev_perm", "stride_perm", "candidate_perms", "inverse_perm", "activation_gram",
           "relative_error", "weighted_error"]
