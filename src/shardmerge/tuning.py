"""The sizes that bound a merge's memory and set its pace: decided here once, read by the
planner (for its estimates and the blocks it fixes) and by the merge itself."""

# Bytes the executor's untouched-tensor conversion works through at a time.
COPY_CHUNK_BYTES = 16 * 1024 * 1024
# The largest host buffer locked (pinned) for copies to and from a GPU: merge blocks, copy
# chunks and their outputs (a float16 chunk widened to float32) fit; a larger buffer (a whole
# tensor some ops need) is pageable, so that locked memory stays bounded whatever the
# tensors' sizes.
PINNED_BUFFER_BYTES = 2 * COPY_CHUNK_BYTES
# Elements of a merged tensor worked on at once (4 MB in float32): what bounds memory, small
# enough that a block's passes (widen, product, round, check) find it in the CPU's cache, and
# large enough that each product still runs at full speed. Fixed, because a BLAS may round a
# product of another shape differently in the last bit (it does for products of a few rows),
# and a resumed merge must give the same bytes as an uninterrupted one. 4M-element blocks
# gave the same bytes for every adapter kind; 1M saves a tenth of the CPU time.
MERGE_BLOCK_ELEMENTS = 1024 * 1024
# The same for a packed weight (MXFP4, packed integers), whose blocks hold three float32
# copies and the room to unpack and round them: a quarter as many, for the same memory.
PACKED_BLOCK_ELEMENTS = 256 * 1024
# The writer's staging buffers: every byte of a shard passes through one on its way to the
# file (written with direct I/O where possible) and the hashes.
STAGING_BYTES = 8 * 1024 * 1024
STAGING_BUFFERS = 3
# float32 copies of a block a packed weight's merge holds at most: the merged value, the
# base's, the update, and the room to unpack and round (6 bytes a value).
PACKED_COPIES = 5
# FP8 values widened to float32 at a time: their int16 room (1 MiB) stays in the CPU's cache.
WIDEN_CHUNK = 256 * 1024
