"""DARE's random masks, the same bytes whatever order or blocks a tensor is merged in.

Element n of a tensor (row-major, counted from 0 in the stored tensor) is kept when the n-th
32-bit number of its stream is below ceil(density * 2^32). The stream is Philox4x64-10
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011; numpy's
``numpy.random.Philox``) keyed with the first 16 bytes of sha256 of ``"{seed}:{tensor name}"``
(two little-endian 64-bit words), its 64-bit outputs in order (``random_raw``), each split
into its low 32 bits, then its high 32 bits. Philox is counter-based: any element's number is
reached directly, so every block draws only its own.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_OUTPUTS_PER_COUNTER = 4  # Philox4x64 yields four 64-bit words for each counter value


def keep_mask(seed: int, name: str, offset: int, count: int, density: float) -> np.ndarray:
    """Which of elements ``offset`` to ``offset + count`` of tensor ``name`` DARE keeps."""
    key = np.frombuffer(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:16], dtype="<u8")
    first, last = offset // 2, (offset + count - 1) // 2  # the 64-bit outputs holding them
    start = first // _OUTPUTS_PER_COUNTER * _OUTPUTS_PER_COUNTER
    raw = np.random.Philox(key=key, counter=start // _OUTPUTS_PER_COUNTER).random_raw(last + 1 - start)
    numbers = raw.astype("<u8", copy=False).view("<u4")[offset - 2 * start :][:count]
    return numbers < math.ceil(density * 2**32)
