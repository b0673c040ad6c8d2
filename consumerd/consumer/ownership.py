"""Who consumes which partition on this host: leases and worker membership.

Design (and its limits):

* **Partition leases** are ``flock`` locks on one file per partition queue in a directory
  shared by every consumerd process on the host that uses the same broker. A worker
  consumes a partition only while it holds its lease, and releases it only after it has
  stopped consuming it and returned its prefetched messages; the kernel drops the lease
  when the process dies, even on SIGKILL. So two workers on one host never consume one
  partition at the same moment, whatever the broker, and a new owner takes over as soon
  as the old one has let go. The holder writes its pid into the file, so a waiting
  worker can say whom it waits for.
* **Membership** (how many workers this host runs now, W) is read from one small file
  per worker slot holding the pid of its current incarnation. W is one more than the
  highest slot whose pid is alive. The supervision core starts and stops workers on
  SIGTTIN/SIGTTOU/reconfigure without telling the others, so workers look: a new higher
  slot raises W at once; a vanished one lowers W only after ``grace`` seconds, so a
  crashed worker respawned within that time does not reshuffle every partition. Until
  the first look a worker assumes the ``--workers`` count it was started with.
* Across hosts (``--member I/M``) there is no shared lock: every host must run the same
  W. RabbitMQ still guarantees one active consumer per partition (single-active-consumer
  queues); on Redis and SQLite a change of W on one host is not coordinated with the
  others.
* **Safety in a shared /tmp**: the root ``$TMPDIR/consumerd-<uid>`` has a predictable
  name, so another local user could create it first, fake members, hold a partition's
  lock or plant symlinks. It is created 0700 and, found existing, used only if it is a
  real directory owned by us with no access for others (:func:`private_dir`);
  everything below it is then ours. Files are opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import time
import typing

from consumerd.supervisor.osproc import pid_exists

LOG = logging.getLogger("consumerd.consumer")


class UnsafePath(OSError):
    """A path in a shared directory that is not ours alone: refuse to use it."""


def private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if missing, and check that it is ours alone.

    Raises :class:`UnsafePath` if it is a symlink or not a directory, belongs to another
    user, or others may write in it; one of ours that others may only read (as older
    releases made them) is narrowed to 0700.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path) or not os.path.isdir(path):
            raise UnsafePath(f"{path} is not a directory (a symlink or a file is there)") from None
        raise UnsafePath(f"{path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise UnsafePath(f"{path} belongs to uid {info.st_uid}, not to us ({os.geteuid()})")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022:
            raise UnsafePath(f"{path} is writable by other users (mode {mode:o})")
        if mode & 0o077:
            # Ours, and nobody else could write in it (an older release made it 0755).
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def private_tree(root: str, *parts: str) -> str:
    """``root/parts...``, each level created or checked by :func:`private_dir`."""
    path = private_dir(root)
    for part in parts:
        path = private_dir(os.path.join(path, part))
    return path


def lease_root(broker_url: str) -> str:
    """The per-host, per-broker directory holding leases and membership files."""
    digest = hashlib.sha1(broker_url.encode("utf-8")).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"consumerd-{os.getuid()}", digest)


def check_lease_root(broker_url: str) -> str:
    """Create or check the lease root of ``broker_url``; :class:`UnsafePath` if unsafe."""
    root = lease_root(broker_url)
    return private_tree(os.path.dirname(root), os.path.basename(root))


class Leases:
    """Exclusive, crash-released leases on named resources (``flock`` on files)."""

    def __init__(self, root: str) -> None:
        self.root = private_tree(os.path.dirname(root), os.path.basename(root), "leases")
        self._held: dict[str, int] = {}

    def try_acquire(self, name: str) -> bool:
        if name in self._held:
            return True
        fd = os.open(
            os.path.join(self.root, name),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[name] = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:  # only the waiters' log line loses the pid
            LOG.debug("could not write our pid into lease %s: %s", name, exc)
        return True

    def holder(self, name: str) -> int | None:
        """The pid holding lease ``name`` if it is known and alive (and not us): a
        holder that has just taken it may not have written its pid yet."""
        try:
            with open(os.path.join(self.root, name)) as f:
                pid = int(f.read() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid > 0 and pid != os.getpid() and pid_exists(pid) else None

    def release(self, name: str) -> None:
        fd = self._held.pop(name, None)
        if fd is not None:
            # Emptied while still held: a pid in the file then always names the holder
            # (or a holder that died), which the web page's partition map relies on.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)


class Membership:
    """This host's worker count W as seen by worker ``worker_id`` (see the module docstring)."""

    def __init__(
        self, root: str, group: str, worker_id: int, hint: int, grace: float = 3.0
    ) -> None:
        self.dir = private_tree(os.path.dirname(root), os.path.basename(root), "members", group)
        self.worker_id = worker_id
        self.grace = grace
        self._workers = max(hint, worker_id + 1)
        self._lower_since: float | None = None

    def join(self) -> None:
        path = os.path.join(self.dir, str(self.worker_id))
        tmp = f"{path}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover of a dead process with our pid
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, path)

    def leave(self) -> None:
        """Remove our slot file on a clean exit (not a successor's: SIGUSR2 replaces a
        worker by a new one with the same slot before the old one exits), so a recycled
        pid can never make a stale slot look alive."""
        path = os.path.join(self.dir, str(self.worker_id))
        with contextlib.suppress(OSError, ValueError), _open_nofollow(path) as f:
            if int(f.read()) == os.getpid():
                os.unlink(path)

    def _highest_alive(self) -> int:
        highest = self.worker_id
        for entry in os.listdir(self.dir):
            if not entry.isdigit() or int(entry) <= highest:
                continue
            with (
                contextlib.suppress(OSError, ValueError),
                _open_nofollow(os.path.join(self.dir, entry)) as f,
            ):
                if pid_exists(int(f.read())):
                    highest = int(entry)
        return highest

    def workers(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        seen = self._highest_alive() + 1
        if seen >= self._workers:
            self._workers, self._lower_since = seen, None
        elif self._lower_since is None:
            self._lower_since = now
        elif now - self._lower_since >= self.grace:
            self._workers, self._lower_since = seen, None
        return self._workers


def _open_nofollow(path: str) -> typing.TextIO:
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
