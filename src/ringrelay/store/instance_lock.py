"""One serving process per SQLite file: an exclusive `flock` on `<database>.lock`, held for the
process's lifetime.

SQLite keeps delivery claims in the process's memory (see store/sqlite.py), so two servers on
one file would each claim, and push, every device of every call. flock(2) rather than SQLite's
own locking: `locking_mode=EXCLUSIVE` would also lock out the checkpointer's connections and the
admin commands (`ringrelay keys`, `db upgrade`), which may share the file with a server. The
kernel drops the lock when the process dies, however it dies (kill -9 included), so a restart
never finds a stale lock. flock is per open file: it does not hold across NFS, where SQLite's own
locking is unreliable anyway (sqlite.org/faq.html#q5).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ringrelay.store import StoreInUse


class InstanceLock:
    def __init__(self, database_path: str) -> None:
        self.database = database_path
        self.path = Path(f"{database_path}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise StoreInUse naming the holder; a no-op when already held."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"{self.database} is already served by another ringrelay process (pid {holder}). "
                "SQLite serves one instance only: two would each push every call. Stop the "
                "other process, give this one its own database file, or run several "
                "instances on PostgreSQL (RINGRELAY_DATABASE_URL=postgresql://...)."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for the message above (the lock, not the file, is what counts).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
