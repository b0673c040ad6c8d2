"""consumerd installed alone, as a user gets it: a new virtualenv, ``pip install <repo>``
(no extras, no system site-packages), then ``consumerd publish`` and ``consumerd --app``
against the real Redis and RabbitMQ, counting messages in and out.

Done twice: with what pip picks today (the newest releases in the pinned ranges) and with
every range's lowest release forced (``consumerd/deps.py``), so both ends of what
``pyproject.toml`` allows are run. One virtualenv per end for the whole session. A broker
that is down fails the test (the ``broker`` fixture), never skips it.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from packaging.version import Version

from consumerd import deps
from tests.consumer.conftest import ROOT
from tests.helpers import children_of, wait_for

APP = """
import os

import consumerd

app = consumerd.App("installed")


@app.consumer(os.environ["T_QUEUE"])
def handle(body, message):
    fd = os.open(os.environ["T_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"%d\\n" % body["i"])
    os.close(fd)
"""

#: The distributions whose ranges are pinned, at their lowest release.
LOWEST = [f"{d}=={spec.split(',')[0].removeprefix('>=')}" for d, spec in deps.SUPPORTED.items()]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would put this checkout on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONSUMERD_BROKER_URL")
    }
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="session")
def venvs(tmp_path_factory):
    """``venvs("newest" | "lowest")`` → that virtualenv's bin directory, built once."""
    built: dict[str, str] = {}
    source = tmp_path_factory.mktemp("source")
    # A copy: pip builds in the source tree, which must not gain build/ or *.egg-info.
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, item), source)
    shutil.copytree(
        os.path.join(ROOT, "consumerd"),
        source / "consumerd",
        ignore=shutil.ignore_patterns("__pycache__"),
    )

    def get(end: str) -> str:
        if end not in built:
            venv = tmp_path_factory.mktemp(f"venv-{end}")
            run([sys.executable, "-m", "venv", str(venv)], 120, env=clean_env())
            pins = LOWEST if end == "lowest" else []
            bin_dir = str(venv / "bin")
            run(
                [f"{bin_dir}/python", "-m", "pip", "install", "-q", str(source), *pins],
                300,
                env=clean_env(),
                cwd=str(venv),
            )
            # The fences of the modules that use private internals pass at this end.
            found = run(
                [
                    f"{bin_dir}/python",
                    "-c",
                    "import consumerd.consumer.transport.redis, consumerd.ops.metrics\n"
                    "from consumerd import deps\n"
                    "print(' '.join(f'{d}=={deps.version_of(d)}' for d in deps.SUPPORTED))",
                ],
                60,
                env=clean_env(),
                cwd=str(venv),
            ).stdout.split()
            print(f"{end}: {' '.join(found)}")
            if end == "lowest":  # pip did install the lowest releases
                assert [Version(f.split("==")[1]) for f in found] == [
                    Version(p.split("==")[1]) for p in LOWEST
                ], found
            built[end] = bin_dir
        return built[end]

    return get


@pytest.mark.timeout(300)  # building a virtualenv on a loaded machine
@pytest.mark.parametrize("end", ["newest", "lowest"])
def test_installed_alone_consumes_everything_published(broker, name, tmp_path, venvs, end):
    bin_dir = venvs(end)
    (tmp_path / "installed_app.py").write_text(textwrap.dedent(APP))
    out = tmp_path / "out.txt"
    env = clean_env(PYTHONPATH=str(tmp_path), T_QUEUE=name, T_OUT=str(out))
    consumerd = [f"{bin_dir}/consumerd"]
    log_path = tmp_path / "consumerd.log"

    def publish(i: int) -> None:
        run(
            [
                *consumerd,
                "publish",
                "--broker",
                broker.url,
                "--app",
                "installed_app",
                name,
                f'{{"i": {i}}}',
            ],
            60,
            env=env,
            cwd=str(tmp_path),
        )

    def handled() -> list[int]:
        return [int(n) for n in out.read_text().split()] if out.exists() else []

    def wait_handled(count: int) -> None:
        try:
            wait_for(lambda: len(handled()) >= count, 60, f"{count} messages handled", 0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {handled()}; log:\n{log_path.read_text()}") from None

    proc = None
    try:
        for i in range(3):  # queued before any consumer runs
            publish(i)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*consumerd, "--app", "installed_app", "--broker", broker.url, "--workers", "2"],
                env=env,
                cwd=str(tmp_path),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_handled(3)
        for i in range(3, 5):  # published while it consumes
            publish(i)
        wait_handled(5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc is not None and proc.poll() is None:
            for pid in children_of(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)
        depth, unacked = broker.depth(name), broker.unacked()
        broker.cleanup([name])
    assert collections.Counter(handled()) == collections.Counter(range(5))  # in == out
    assert depth == 0 and unacked == 0
