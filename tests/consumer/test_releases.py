"""A broken release never takes the service down: a SIGUSR2 code reload is checked in a
child first, and a SIGHUP app reload survives an app that exits at import."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from tests.consumer.conftest import APP_SOURCE, Consumerd, publish_many, wait_for

CANCELLED = "code reload cancelled: the new code failed its pre-flight check"


@pytest.fixture
def embedded(tmp_path, name):
    c = Consumerd(tmp_path, name, f"sqlite:///{tmp_path}/broker.db")
    yield c
    c.kill()


def release(root, number: int, source: str) -> str:
    path = root / "releases" / str(number)
    path.mkdir(parents=True)
    (path / "tapp.py").write_text(textwrap.dedent(source))
    return str(path)


def switch(root, target: str) -> None:
    """An atomic deploy: the `current` symlink now names ``target``."""
    tmp = root / "current.new"
    tmp.symlink_to(target)
    os.replace(tmp, root / "current")


def handled_by_the_same_workers(c: Consumerd, pids: list[int], start: int) -> None:
    publish_many(c.url, c.name, 10, start=start)
    wait_for(
        lambda: {r.id for r in c.records()} >= set(range(start, start + 10)),
        30,
        "10 later messages handled",
    )
    assert sorted(c.workers()) == sorted(pids)
    assert {r.pid for r in c.records() if r.id >= start} <= set(pids)


def test_sigusr2_with_a_broken_release_keeps_the_old_one_running(embedded, tmp_path):
    c = embedded
    c.configure([{"name": c.name}])
    good = release(tmp_path, 1, APP_SOURCE)
    switch(tmp_path, good)
    (tmp_path / "tapp.py").unlink()  # only the release directories hold the app
    current = str(tmp_path / "current")
    c.start(workers=2, cwd=current)
    pids = c.wait_workers(2)
    c.wait_logged("consuming", 2)
    master = c.proc.pid

    # A release whose app raises at import, behind the symlink the re-exec follows (the
    # release the master runs from is still good: the check must look where it will).
    switch(tmp_path, release(tmp_path, 2, "raise RuntimeError('missing setting')\n"))
    c.signal(signal.SIGUSR2)
    c.wait_logged(CANCELLED)
    assert c.logged("importing it failed: RuntimeError: missing setting") == 1
    assert c.proc.poll() is None and c.proc.pid == master
    handled_by_the_same_workers(c, pids, 0)

    # A release whose app calls os._exit() at import: no exception to catch at all.
    switch(tmp_path, release(tmp_path, 3, "import os\nos._exit(3)\n"))
    c.signal(signal.SIGUSR2)
    c.wait_logged(CANCELLED, 2)
    assert c.logged("(exited with status 3)") == 1
    handled_by_the_same_workers(c, pids, 100)

    # ... or os._exit(0), which exits with the status of success.
    switch(tmp_path, release(tmp_path, 4, "import os\nos._exit(0)\n"))
    c.signal(signal.SIGUSR2)
    c.wait_logged(CANCELLED, 3)
    assert c.logged("ended the process with status 0 before it loaded") == 1
    handled_by_the_same_workers(c, pids, 200)

    # A good release goes through: every worker is replaced, the master's pid is kept.
    switch(tmp_path, release(tmp_path, 5, APP_SOURCE))
    c.signal(signal.SIGUSR2)
    c.wait_logged("code reload complete")
    assert c.proc.pid == master and c.proc.poll() is None
    new = c.wait_workers(2)
    assert set(new).isdisjoint(pids)
    assert c.stop() == 0


def test_sigusr2_with_a_config_file_that_does_not_parse_keeps_running(embedded, tmp_path):
    c = embedded
    c.configure([{"name": c.name}])
    toml = tmp_path / "consumerd.toml"
    toml.write_text("prefetch = 10\n")
    c.start("--config", str(toml), workers=2)
    pids = c.wait_workers(2)
    c.wait_logged("consuming", 2)
    toml.write_text("prefetch = [\n")
    c.signal(signal.SIGUSR2)
    c.wait_logged(CANCELLED)
    assert c.logged("is not valid TOML") == 1
    handled_by_the_same_workers(c, pids, 0)
    assert c.stop() == 0


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"])
def test_sighup_with_an_app_that_exits_at_import_keeps_the_workers(embedded, exit_call):
    c = embedded
    c.configure([{"name": c.name}])
    c.start(workers=2)
    pids = c.wait_workers(2)
    c.wait_logged("consuming", 2)
    (c.tmp / "tapp.py").write_text(exit_call)
    c.signal(signal.SIGHUP)
    c.wait_logged("reload failed, the running configuration and consumers stay", 2)
    handled_by_the_same_workers(c, pids, 0)
    assert c.logged("exited with status") == 0  # no worker died and was respawned
    assert c.stop() == 0
