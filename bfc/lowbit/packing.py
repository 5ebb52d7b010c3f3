"""Bit packing of low-bit integer codes (int2 / int3 / int4 / int8).

Codes are unsigned integers ``0 <= u < 2**bits`` (signed values are stored with an
offset, see ``groups``).  They are packed as one little-endian bit stream: code ``i``
occupies bits ``[i*bits, (i+1)*bits)`` of the stream, bit 0 being the least significant
bit of byte 0.  Hence

* int4: two codes per byte, code ``2j`` in the low nibble of byte ``j``;
* int2: four codes per byte, code ``4j`` in bits 0-1;
* int3: eight codes in three bytes (24 bits), code ``8j + t`` at bits ``3t .. 3t+2`` of the
  little-endian 24-bit word made of bytes ``3j, 3j+1, 3j+2`` (no padding nibbles: 3.0 bits
  per weight, not 4);
* int8: one code per byte.

The stream is zero-padded to a whole chunk of ``lcm(bits, 8) / bits`` codes.  For 2, 4
and 8 bits this is the order onnxruntime's ``MatMulNBits`` uses inside a block.
"""
from __future__ import annotations

from math import lcm

import numpy as np

from bfc.errors import InvalidInputError

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise InvalidInputError(f"bits={bits!r} is not packable; allowed: {SUPPORTED_BITS}")
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy (stream padded to whole chunks)."""
    bits = _check_bits(bits)
    per = lcm(bits, 8) // bits
    return -(-count // per) * (lcm(bits, 8) // 8)


def pack_bits(codes, bits: int) -> np.ndarray:
    """Flat uint8 stream of the codes (flattened in C order), see the module docstring."""
    bits = _check_bits(bits)
    u = np.asarray(codes).reshape(-1)
    if u.size and (u.min() < 0 or u.max() >= (1 << bits)):
        raise InvalidInputError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, "
                                f"got [{u.min()}, {u.max()}]")
    per = lcm(bits, 8) // bits                 # codes per chunk
    nb = lcm(bits, 8) // 8                     # bytes per chunk
    pad = (-u.size) % per
    u = np.concatenate([u.astype(np.uint64), np.zeros(pad, np.uint64)]).reshape(-1, per)
    word = np.zeros(u.shape[0], np.uint64)
    for t in range(per):
        word |= u[:, t] << np.uint64(t * bits)
    out = np.empty((u.shape[0], nb), np.uint8)
    for j in range(nb):
        out[:, j] = ((word >> np.uint64(8 * j)) & np.uint64(0xFF)).astype(np.uint8)
    return out.reshape(-1)


def unpack_bits(stream, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes (uint8) of a stream written by ``pack_bits``."""
    bits = _check_bits(bits)
    s = np.asarray(stream, dtype=np.uint8).reshape(-1)
    per, nb = lcm(bits, 8) // bits, lcm(bits, 8) // 8
    if s.size % nb or s.size // nb * per < count:
        raise InvalidInputError(f"a stream of {s.size} bytes cannot hold {count} codes of {bits} bits")
    s = s.reshape(-1, nb).astype(np.uint64)
    word = np.zeros(s.shape[0], np.uint64)
    for j in range(nb):
        word |= s[:, j] << np.uint64(8 * j)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((s.shape[0], per), np.uint8)
    for t in range(per):
        out[:, t] = ((word >> np.uint64(t * bits)) & mask).astype(np.uint8)
    return out.reshape(-1)[:count]
