"""Writing one shard: ``NAME.tmp`` streamed behind a header computed from the plan, each
tensor copied, converted or computed by the job's merger, with the sink's threads writing
and hashing while the next block is merged; then fsync, and the journal's record."""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from ..errors import NonFiniteError
from ..formats.confined import open_input
from ..formats.fileio import open_output
from ..output import journal as journals
from ..output import outdir
from ..planning.model import Action, ShardPlan
from .merger import TensorMerger
from .sink import Written
from .stop import StopRequest


def write_shard(
    merger: TensorMerger, shard: ShardPlan, folder: Path, progress: tqdm, stop: StopRequest, attempt: str = ""
) -> journals.ShardRecord:
    """Write one shard as ``NAME.tmp`` (``NAME.ATTEMPT.tmp``) and fsync it; a failure removes
    the temp file."""
    final = folder / shard.name
    tmp = outdir.tmp_path(final, attempt)
    header = shard.header_bytes()
    sink = merger.sink
    try:
        with ExitStack() as stack:
            src = open_input(shard.source)
            stack.callback(os.close, src)
            dst, direct = open_output(tmp)
            stack.callback(os.close, dst)
            stack.callback(sink.discard)  # first: the sink may still use both files
            progress.set_postfix_str(shard.name, refresh=False)
            merger.begin_shard(folder)
            sink.start(dst, direct)
            sink.write(memoryview(header))
            progress.update(len(header))
            for tensor in shard.tensors:
                stop.check()
                if tensor.computed:
                    with merger.naming(tensor):
                        merger.write_tensor(src, tensor)
                elif tensor.action is Action.COPY:
                    sink.copy(src, tensor.src_begin, tensor.src_end - tensor.src_begin)
                else:
                    merger.convert(src, tensor)
                progress.update(tensor.end - tensor.begin)
            written = sink.digest()
            os.fsync(dst)
            # The bytes are on disk: hand their cache pages back now, so later shards reuse
            # them instead of growing the page cache by the size of the model.
            os.posix_fadvise(dst, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(final)  # writes through a descriptor name no file
        if isinstance(exc, NonFiniteError) and exc.file is None:
            exc.file = str(final)
        raise
    return record(merger, shard, written, header)


def record(merger: TensorMerger, shard: ShardPlan, written: Written, header: bytes) -> journals.ShardRecord:
    """The journal's record of ``shard``, as ``written``."""
    context = merger.context
    names = [tensor.name for tensor in shard.tensors]
    requantized = context.requantized
    return journals.ShardRecord(
        written.size,
        written.xxh3_128,
        hashlib.sha256(header).hexdigest(),
        merged=tuple(tensor.name for tensor in shard.tensors if tensor.ops),
        converted=tuple(t.name for t in shard.tensors if not t.ops and t.dtype != t.src_dtype),
        unchanged=tuple(name for name in names if name in context.unchanged),
        non_finite_kept=tuple(name for name in names if name in context.kept_non_finite),
        sha256=written.sha256,
        # a weight whose NaN or Inf came from the base has no figures: reported apart
        requantized=tuple(
            (name, *requantized[name])
            for name in names
            if name in requantized and all(map(math.isfinite, requantized[name]))
        ),
        device=context.place.name,
    )
