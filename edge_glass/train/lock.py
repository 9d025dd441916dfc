"""One training process per run directory: an exclusive lock on ``RUN/.lock`` (fcntl.flock, so
the kernel releases it when the holder dies, even by SIGKILL) that records the holder's pid."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..atomic import write_error
from ..errors import EdgeGlassError


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only or full disk, a file in the way: one line naming the run
            raise write_error(self.path.parent, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EdgeGlassError(f"{self.path.parent}: another training process (pid {holder}) is using this run directory; "
                                 "wait for it or stop it, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
