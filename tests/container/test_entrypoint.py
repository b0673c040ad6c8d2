"""The image's entrypoint as PID 1, without Docker: the same command line in a new PID
namespace (``unshare --pid``), where the master is PID 1 as in a container."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import children_of, wait_for, zombies_of

ROOT = Path(__file__).resolve().parents[2]
CONSUMERD = shutil.which("consumerd") or "consumerd"


def dockerfile_command(instruction: str) -> list[str]:
    """The exec-form JSON array of a Dockerfile instruction (the last one wins)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = None
    for line in text.splitlines():
        words = line.split(None, 1)
        if words and words[0] == instruction:
            found = json.loads(words[1][words[1].index("[") :])
    assert found, f"no exec-form {instruction} in the Dockerfile"
    return found


def test_dockerfile_runs_consumerd_as_non_root_in_exec_form() -> None:
    text = (ROOT / "Dockerfile").read_text()
    entrypoint = dockerfile_command("ENTRYPOINT")
    assert entrypoint[0] == "consumerd"
    assert "\nUSER consumerd" in text
    timeout = float(entrypoint[entrypoint.index("--graceful-timeout") + 1])
    assert timeout < 10  # docker stop's default grace before SIGKILL
    assert "HEALTHCHECK" in text


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root for a PID namespace",
)
def test_entrypoint_as_pid_1_drains_reaps_and_reports_health(tmp_path) -> None:
    out = tmp_path / "handled.log"
    pidfile = str(tmp_path / "consumerd.pid")
    env = {k: v for k, v in os.environ.items() if k != "CONSUMERD_BROKER"}
    env.update(T_OUT=str(out), PYTHONPATH=str(ROOT))

    def swap_pidfile(argv: list[str]) -> list[str]:
        return [pidfile if a == "/tmp/consumerd.pid" else a for a in argv]

    entrypoint = swap_pidfile(dockerfile_command("ENTRYPOINT"))
    health = swap_pidfile(dockerfile_command("HEALTHCHECK"))
    command = [*entrypoint, "--app", "tests.container.app", "--workers", "2"]

    total = 40
    bodies = [json.dumps({"i": 0, "orphan": True})]
    bodies += [json.dumps({"i": i, "sleep": 0.2}) for i in range(1, total + 1)]
    subprocess.run(
        [CONSUMERD, "publish", "--app", "tests.container.app", "work", *bodies],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=60,
    )

    def handled(kind: str) -> list[int]:
        if not out.exists():
            return []
        return [
            int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith(kind)
        ]

    ns = subprocess.Popen(
        ["unshare", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child", *command],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        master = wait_for(lambda: children_of(ns.pid), 10, "the namespace's pid 1")[0]
        wait_for(lambda: 0 in handled("end"), 30, "the orphan-making message")
        # The grandchild (sleep 0.2 s) was reparented to PID 1, which must reap it.
        time.sleep(0.6)
        assert zombies_of(master) == []

        check = subprocess.run(  # noqa: PLW1510 - the exit status is what is tested
            ["nsenter", "-t", str(master), "-p", "-m", *health],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        assert "2 worker(s)" in check.stdout

        wait_for(lambda: len(handled("start")) >= 8, 30, "messages in flight")
        os.kill(master, signal.SIGTERM)
        started = time.monotonic()
        assert ns.wait(15) == 0, ns.stderr.read().decode() if ns.stderr else ""
        assert time.monotonic() - started < 8  # within the image's graceful timeout
    finally:
        if ns.poll() is None:
            ns.kill()
            ns.wait(5)

    # Every handler that started also finished: the drain waited for it.
    assert sorted(handled("start")) == sorted(handled("end"))
    done = set(handled("end"))
    assert len(done) < total + 1, "the test must stop the master mid-stream"

    # A second run finishes the queue: nothing was lost, nothing was handled twice.
    rest = subprocess.Popen(
        [CONSUMERD, "--app", "tests.container.app", "--workers", "2", "--graceful-timeout", "8"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(set(handled("end"))) == total + 1, 60, "the rest of the queue")
        rest.send_signal(signal.SIGTERM)
        assert rest.wait(15) == 0
    finally:
        if rest.poll() is None:
            rest.kill()
            rest.wait(5)
    ends = handled("end")
    assert sorted(ends) == list(range(total + 1)), "lost or duplicated messages"
