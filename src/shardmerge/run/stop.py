"""Stopping a merge cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Ctrl-C and SIGTERM during a merge: noted, and acted on between tensors, so the tensor in
    hand is finished and then discarded with its temp file, and a shard is never in place
    without its journal entry. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _note(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
