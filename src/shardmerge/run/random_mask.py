"""DARE's random masks, the same bytes whatever order or blocks a tensor is merged in.

Each adapter's mask of each tensor is drawn from a stream of its own: Philox4x64-10 (Salmon
et al., "Parallel random numbers: as easy as 1, 2, 3", 2011; numpy's ``numpy.random.Philox``)
keyed with the first 16 bytes of sha256 of ``"{seed}:{adapter}:{tensor name}"`` (two
little-endian 64-bit words; ``adapter`` its index in the job, from 0). The stream's 64-bit
outputs in order (``random_raw``) are cut into 16-bit numbers, the lowest bits first. Element
n of the tensor (row-major in the stored tensor, from 0) is kept where the n-th number is
below ceil(density * 2^16). Philox is counter-based: any element's number is reached
directly, so every block draws only its own.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_OUTPUTS_PER_COUNTER = 4  # Philox4x64 yields four 64-bit words for each counter value
_PER_OUTPUT = 4  # 16-bit numbers in a 64-bit word


def keep_mask(seed: int, adapter: int, name: str, offset: int, count: int, density: float) -> np.ndarray:
    """Which of elements ``offset`` to ``offset + count`` of tensor ``name`` DARE keeps of
    adapter ``adapter``'s update."""
    key = np.frombuffer(hashlib.sha256(f"{seed}:{adapter}:{name}".encode()).digest()[:16], dtype="<u8")
    first, last = offset // _PER_OUTPUT, (offset + count - 1) // _PER_OUTPUT  # the outputs holding them
    start = first // _OUTPUTS_PER_COUNTER * _OUTPUTS_PER_COUNTER
    raw = np.random.Philox(key=key, counter=start // _OUTPUTS_PER_COUNTER).random_raw(last + 1 - start)
    numbers = raw.astype("<u8", copy=False).view("<u2")[offset - _PER_OUTPUT * start :][:count]
    return numbers < math.ceil(density * 2**16)
