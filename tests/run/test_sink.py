"""The sink: the file holds exactly the bytes handed over, and the hashes are theirs, with
direct I/O (whole blocks, the last one padded, then the file cut) and without."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import xxhash

from shardmerge.formats.fileio import open_output
from shardmerge.planning.planner import STAGING_BYTES
from shardmerge.run.sink import ShardSink

# Pieces across the edges that matter: block-aligned and not, smaller and larger than a
# staging buffer, and a copied range straddling two of them.
LENGTHS = [1, 4095, 4096, 4097, 100_000, STAGING_BYTES - 7, STAGING_BYTES + 3, 12_345]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_the_file_and_its_hashes_are_exactly_the_bytes_handed_over(tmp_path: Path, direct: bool) -> None:
    rng = random.Random(3)
    source = tmp_path / "source"
    source_bytes = rng.randbytes(3 * STAGING_BYTES)
    source.write_bytes(source_bytes)
    src = os.open(source, os.O_RDONLY)
    sink = ShardSink([], sha256=True)
    try:
        for number, lengths in enumerate((LENGTHS, LENGTHS[::-1], [STAGING_BYTES], [5])):
            out = tmp_path / f"out-{number}"
            if direct:
                dst, opened_direct = open_output(out)
                assert opened_direct, "this file system takes O_DIRECT"
            else:
                dst, opened_direct = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), False
            expected = bytearray()
            sink.start(dst, opened_direct)
            for index, length in enumerate(lengths):
                if index % 2:
                    offset = rng.randrange(len(source_bytes) - length)
                    sink.copy(src, offset, length)
                    expected += source_bytes[offset : offset + length]
                else:
                    data = rng.randbytes(length)
                    sink.write(memoryview(data))
                    expected += data
            written = sink.digest()
            os.close(dst)
            assert out.read_bytes() == expected
            assert written.size == len(expected)
            assert written.xxh3_128 == xxhash.xxh3_128(bytes(expected)).hexdigest()
            assert written.sha256 == hashlib.sha256(expected).hexdigest()
    finally:
        os.close(src)
        sink.close()
