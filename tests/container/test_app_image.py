"""A user's app in an image: ``Dockerfile`` builds the consumerd base image and
``deploy/Dockerfile.app`` builds the app on top of it (``FROM consumerd`` + ``COPY myapp/``).

There is no Docker engine here, so :mod:`tests.container.image` does what the two builds
do (files laid out as their COPY lines say, ENV/WORKDIR/ENTRYPOINT/CMD/HEALTHCHECK
inherited as Docker does), and the app image's ``docker run`` command runs as PID 1 of a
new PID namespace, consuming messages that are counted in and out.
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.container.image import Image, build
from tests.helpers import children_of, wait_for

ROOT = Path(__file__).resolve().parents[2]
CONSUMERD = shutil.which("consumerd") or "consumerd"


def reader_env(**extra: str) -> dict[str, str]:
    """The host's environment without the test run's consumerd settings or paths."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CONSUMERD_") and k != "PYTHONPATH"
    }
    env.update(extra)
    return env


def images(tmp_path: Path) -> tuple[Image, Image]:
    """``docker build -t consumerd .`` here, then ``docker build -f Dockerfile.app -t
    myapp .`` in a project holding myapp/ (the container test's counting app)."""
    base = build(ROOT / "Dockerfile", ROOT, tmp_path / "consumerd-image")
    project = tmp_path / "project"
    (project / "myapp").mkdir(parents=True)
    (project / "myapp" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "container" / "app.py", project / "myapp" / "consumers.py")
    shutil.copy(ROOT / "deploy" / "Dockerfile.app", project / "Dockerfile.app")
    app = build(project / "Dockerfile.app", project, tmp_path / "myapp-image", {"consumerd": base})
    return base, app


def test_app_image_keeps_the_base_entrypoint_and_adds_the_app(tmp_path) -> None:
    base, app = images(tmp_path)
    assert app.entrypoint == base.entrypoint and app.entrypoint[0] == "consumerd"
    assert app.healthcheck == base.healthcheck
    assert app.user == base.user == "consumerd"
    assert (app.path("/app/consumerd/__init__.py")).is_file()  # from the base image
    assert (app.path("/app/myapp/consumers.py")).is_file()
    assert app.env_vars["CONSUMERD_APP"] == "myapp.consumers"
    assert "/app" in app.env_vars["PYTHONPATH"].split(":")


def test_base_image_alone_cannot_find_the_app(tmp_path) -> None:
    """What issue #10 reported: the project's image holds no user app."""
    base, _ = images(tmp_path)
    env = base.env(reader_env())
    env["CONSUMERD_APP"] = "myapp.consumers"  # as `docker run -e ... consumerd` would
    done = subprocess.run(  # noqa: PLW1510 - the exit status is what is tested
        base.command(),
        cwd=base.cwd(),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "myapp" in done.stderr


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for a PID namespace",
)
def test_app_image_runs_the_app_as_pid_1(tmp_path) -> None:
    _, app = images(tmp_path)
    out = tmp_path / "handled.log"
    env = app.env(reader_env(T_OUT=str(out)))
    cwd = app.cwd()  # WORKDIR: the embedded broker lives in ./.consumerd/ there

    total = 30
    bodies = [json.dumps({"i": i}) for i in range(total)]
    # `docker run --entrypoint consumerd myapp publish --app myapp.consumers work ...`
    subprocess.run(
        [CONSUMERD, "publish", "--app", env["CONSUMERD_APP"], "work", *bodies],
        cwd=cwd,
        env=env,
        check=True,
        timeout=60,
    )

    def ended() -> list[int]:
        if not out.exists():
            return []
        return [
            int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("end ")
        ]

    # `docker run myapp`: the image's ENTRYPOINT + CMD, the master as PID 1.
    command = app.command()
    assert "--app" not in command, "the app image's app comes from its ENV"
    ns = subprocess.Popen(
        ["unshare", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child", *command],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        master = wait_for(lambda: children_of(ns.pid), 10, "the namespace's pid 1")[0]
        wait_for(lambda: len(ended()) == total, 60, f"{total} messages handled")
        check = subprocess.run(  # noqa: PLW1510
            ["nsenter", "-t", str(master), "-p", "-m", *app.health_command()],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        assert "2 worker(s)" in check.stdout  # the app image's CMD
        os.kill(master, signal.SIGTERM)  # docker stop
        assert ns.wait(15) == 0, ns.stderr.read().decode() if ns.stderr else ""
    finally:
        if ns.poll() is None:
            ns.kill()
            ns.wait(5)
    assert sorted(ended()) == list(range(total)), "lost or duplicated messages"
