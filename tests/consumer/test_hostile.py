"""Another local user must not take over consumerd's paths in shared directories, nor read
the embedded broker. Tests run as root; the hostile user is ``nobody``."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import kombu
import pytest

from tests.consumer.conftest import Consumerd, wait_for

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NOBODY, *command], capture_output=True, text=True, check=True, timeout=30
    )


@pytest.fixture
def shared():
    """A world-writable sticky directory, like /tmp, that only this test uses."""
    path = tempfile.mkdtemp(prefix="consumerd-shared-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def c(tmp_path, name):
    c = Consumerd(tmp_path, name, f"sqlite:///{tmp_path}/broker.db")
    c.configure([{"name": name, "partitions": 2}])
    yield c
    c.kill()


def children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def one_line_exit_2(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("consumerd: error: "), result.stderr
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_lease_root_planted_by_another_user_is_refused(c, shared, planted):
    root = os.path.join(shared, f"consumerd-{os.getuid()}")
    if planted == "directory":
        as_nobody("mkdir", "-m", "0777", root)  # could fake members and hold leases
        expected = "belongs to uid"
    else:
        as_nobody("ln", "-s", str(c.tmp), root)  # would send our files where it likes
        expected = "is not a directory (a symlink or a file is there)"
    result = c.cli("--app", "tapp", "--broker", c.url, TMPDIR=shared)
    one_line_exit_2(result, f"partition lease directory: {root}")
    assert expected in result.stderr
    assert os.lstat(root).st_uid != 0  # left as it was


def test_the_lease_root_is_private(c, shared):
    env = {**c.env(), "TMPDIR": shared}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "consumerd.cli",
            "--app",
            "tapp",
            "--broker",
            c.url,
            "--workers",
            "1",
        ],
        cwd=c.tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        root = os.path.join(shared, f"consumerd-{os.getuid()}")
        wait_for(
            lambda: os.path.isdir(root) and any("leases" in dirs for _, dirs, _ in os.walk(root)),
            20,
            "the lease directories",
        )
        for path, dirs, _ in os.walk(root):
            for d in [path, *(os.path.join(path, d) for d in dirs)]:
                info = os.lstat(d)
                assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == 0, d
        denied = subprocess.run([*NOBODY, "ls", root], capture_output=True, check=False)
        assert denied.returncode != 0
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_pidfile_never_writes_through_a_planted_symlink(c, shared):
    victim_dir = c.tmp / "private"
    victim_dir.mkdir(mode=0o700)
    victim = victim_dir / "important"
    victim.write_text("root's data\n")
    pidfile = os.path.join(shared, "consumerd.pid")
    # The master's pid is known before it runs: `exec` keeps the shell's.
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'read go; exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "consumerd.cli",
            "--app",
            "tapp",
            "--broker",
            c.url,
            "--workers",
            "1",
            "--pidfile",
            pidfile,
        ],
        cwd=c.tmp,
        env=c.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        as_nobody("ln", "-s", str(victim), f"{pidfile}.{proc.pid}")  # the old temporary name
        proc.stdin.write("go\n")
        proc.stdin.close()
        wait_for(
            lambda: (
                os.path.isfile(pidfile)
                and not os.path.islink(pidfile)
                and Path(pidfile).read_text().strip() == str(proc.pid)
            ),
            20,
            "the pid file",
        )
        assert victim.read_text() == "root's data\n"
        assert stat.S_IMODE(os.stat(pidfile).st_mode) == 0o644
        wait_for(lambda: children(proc.pid), 20, "a worker")  # the master's handlers are set
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    assert victim.read_text() == "root's data\n"


def test_the_embedded_broker_is_not_readable_by_other_users(c):
    c.url = None  # the default: ./.consumerd/broker.db
    c.start(workers=1)
    c.wait_logged("consuming")
    folder = c.tmp / ".consumerd"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for path in folder.iterdir():  # broker.db, -wal, -shm
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path
    assert c.stop() == 0


def test_a_database_in_a_shared_directory_leaves_the_directory_as_it_was(shared):
    """A root consumerd whose database sits in /tmp once narrowed /tmp to 1770: every
    other user lost it. The file is what must be private, never the folder it is put in."""
    url = f"sqlite:///{shared}/broker.db"
    with kombu.Connection(url, transport="consumerd.consumer.transport.sqlite:Transport") as conn:
        conn.SimpleQueue("q").put({"n": 1})
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(f"{shared}/broker.db").st_mode) & 0o077 == 0
    as_nobody("touch", f"{shared}/still-mine")  # other users still use the directory


@pytest.mark.parametrize("planted", ["file", "symlink"])
def test_a_wal_planted_by_another_user_is_refused(c, shared, planted):
    """SQLite keeps a ``-wal`` it finds, with its owner, mode or symlink target: one
    planted next to our database would let another user read every message. consumerd
    refuses the database as it refuses a symlinked one, before any worker starts: one line
    naming the file, exit status 2."""
    url = f"sqlite:///{shared}/broker.db"
    wal = f"{shared}/broker.db-wal"
    with kombu.Connection(url, transport="consumerd.consumer.transport.sqlite:Transport") as conn:
        conn.SimpleQueue("q").put({"n": 1})  # ours, closed: SQLite removed its -wal
    assert not os.path.lexists(wal)
    if planted == "file":
        as_nobody("sh", "-c", f"umask 0; touch {wal}")
        expected = "companion file belongs to uid"
    else:
        as_nobody("ln", "-s", f"{shared}/elsewhere", wal)
        expected = "companion file is a symbolic link"
    c.start(workers=1, url=url)
    assert c.proc is not None and c.proc.wait(30) == 2
    (line,) = Path(c.log).read_text().splitlines()
    assert line.startswith("consumerd: error: cannot use") and expected in line and wal in line
    if planted == "file":
        assert os.stat(wal).st_size == 0  # nothing written to it
    else:
        assert not os.path.lexists(f"{shared}/elsewhere")  # nor created where it points
