"""One process per run folder: an exclusive lock held from before the first check until the process ends.

The lock is `fcntl.flock` on `.deltatune.lock` inside the folder. The kernel releases it when the process ends,
however it ends (kill -9 included), so a lock left by a dead process is never stale and needs no clean-up.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

LOCK_FILE = ".deltatune.lock"


class RunInUseError(FileExistsError):
    """Another live process holds the run folder."""


class RunLock:
    """`with RunLock(folder):` holds `folder` for this process; a second process is refused at once."""

    def __init__(self, folder: str, flag: str = "--output") -> None:
        self.folder, self.flag = folder, flag
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: int | None = None
        self._made_folder = False

    def __enter__(self) -> RunLock:
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise FileExistsError(f"{self.flag} {self.folder} is a file; give a folder (new or empty) for the run")
        self._made_folder = not os.path.isdir(self.folder)
        while True:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise RunInUseError(
                    f"{self.flag} {self.folder} is in use by another deltatune run ({holder}); wait for it to end, "
                    f"or choose another {self.flag}"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed that file as it let go: lock the one at the path now
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        """Release; a folder this lock created and nothing else filled is removed again (a run that never began)."""
        if self._fd is None:
            return
        if self._made_folder and os.listdir(self.folder) == [LOCK_FILE]:
            os.remove(self.path)  # while still held: a process that opened the old file is refused, not let in
            _remove_if_empty(self.folder)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:  # another process put its own lock file there meanwhile
        pass
