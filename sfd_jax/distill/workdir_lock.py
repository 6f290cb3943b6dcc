"""One writer per workdir: an exclusive ``flock`` on ``<workdir>/.lock`` held by process 0 for the whole run.

The lock file names its holder (host, pid, start time) so a refused second trainer can say who holds it. The
kernel drops a ``flock`` when its process dies (SIGKILL, OOM, a lost node), so a lock file left behind by a dead
run never blocks a resume; a holder recorded on this host whose pid no longer exists is also taken over (lock
files copied between machines, filesystems without ``flock``). The file is removed when the run ends, so a
failed start leaves the workdir as it found it.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from sfd_jax.cli_utils import UsageError

LOCK_NAME = ".lock"


class WorkdirBusyError(UsageError):
    """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def read_holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class WorkdirLock:
    """``with WorkdirLock(workdir):`` or ``acquire()`` / ``release()``; raises :class:`WorkdirBusyError`."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None
        self._made_workdir = False

    def acquire(self) -> "WorkdirLock":
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise UsageError(f"--workdir {self.workdir} is a file, not a directory")
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
            self._made_workdir = True
        for _ in range(5):   # the file can be replaced between open and flock; retry on a stale inode
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = read_holder(self.path)
                if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                        and not _pid_alive(holder["pid"]):
                    os.replace(self.path, self.path + ".stale")   # a dead holder on this host: take over
                    os.remove(self.path + ".stale")
                    continue
                who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                       f"{holder.get('started', '?')}") if holder else "another process"
                raise WorkdirBusyError(f"workdir {self.workdir} is in use by {who} ({self.path}); wait for that "
                                       "run to finish or stop it, or use another --workdir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise WorkdirBusyError(f"workdir {self.workdir}: could not take {self.path} (it keeps being replaced)")

    def release(self, *, remove_empty_workdir: bool = False) -> None:
        """Drop the lock and its file; with ``remove_empty_workdir`` also the workdir if this lock created it and
        nothing else was written (a failed start)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        if remove_empty_workdir and self._made_workdir:
            try:
                os.rmdir(self.workdir)
            except OSError:
                pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
