"""The ``consumerd`` command line: clear one-line errors with status 2, check, publish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.consumer.conftest import REDIS_URL, ROOT, check_broker


def run(tmp_path, *args, stdin=None, env=None):
    environ = dict(os.environ, PYTHONPATH=f"{ROOT}:{tmp_path}")
    environ.pop("CONSUMERD_BROKER", None)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "consumerd.cli", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin,
        check=False,
    )


@pytest.fixture
def apps(tmp_path):
    (tmp_path / "good.py").write_text(
        "import consumerd\napp = consumerd.App('good')\n"
        "import os\n@app.consumer(os.environ.get('T_JOBS', 'jobs'), partitions=4)\n"
        "def handle(body, message):\n    pass\n"
        "other = 42\n"
    )
    (tmp_path / "empty.py").write_text("import consumerd\napp = consumerd.App('empty')\n")
    (tmp_path / "broken.py").write_text("import consumerd\nraise RuntimeError('no config')\n")
    (tmp_path / "badimport.py").write_text("import does_not_exist_anywhere\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "nosuchmodule"], "no module named 'nosuchmodule'"),
        (["--app", "broken"], "importing it failed: RuntimeError: no config"),
        (["--app", "badimport"], "No module named 'does_not_exist_anywhere'"),
        (["--app", "good:nope"], "has no attribute 'nope'"),
        (["--app", "good:other"], "'other' is a int, not a consumerd.App"),
        (["--app", "empty"], "declares no consumers"),
        (["--app", "not a module"], "expected module[:attribute]"),
        (["--app", "good", "--broker", "nope://x"], "unknown broker scheme 'nope'"),
        (["--app", "good", "--broker", "redis//x"], "malformed broker URL"),
        (["--app", "good", "--broker", "redis://h:99999/0"], "malformed broker URL"),
        (["--app", "good", "--broker", "sqlite://relative.db"], "like sqlite:///relative/path.db"),
        (
            ["--app", "good", "--broker", "sqlite:////proc/nowhere/broker.db"],
            "cannot use '/proc/nowhere/broker.db' as the broker database",
        ),
        (["--app", "good", "--workers", "0"], "--workers: expected an integer >= 1"),
        (["--app", "good", "--workers", "100000"], "workers: 100000 is above the limit of"),
        (["--app", "exits"], "--app 'exits': importing it called sys.exit(0)"),
        (
            ["--app", "good", "--metrics-port", "0", "--metrics-address", "192.0.2.1"],
            "--metrics-address 192.0.2.1 --metrics-port 0: cannot listen: Cannot assign",
        ),
        (["--app", "good", "--member", "2/2"], "M >= 1 and 0 <= I < M"),
        (["--app", "good", "--graceful-timeout", "soon"], "expected a finite number of seconds"),
        (["--app", "good", "--graceful-timeout", "inf"], "expected a finite number of seconds"),
        (["--app", "good", "--graceful-timeout", "nan"], "expected a finite number of seconds"),
        (["--app", "good", "--bogus"], "unrecognized arguments: --bogus"),
        (["--app", "good", "--queues", "jobs,nosuch"], "declares no consumer named nosuch"),
        (["check", "--app", "good", "--queues", "nosuch"], "declares no consumer named nosuch"),
        ([], "--app is required"),
        (["check"], "--app is required"),
        (["helth"], "unknown command 'helth' (did you mean 'health'?); commands: run, publish"),
        (["health"], "--pidfile is required"),
        (["publish", "jobs", "{}", "--workers", "2"], "unrecognized arguments: --workers"),
        (["check", "--app", "empty"], "declares no consumers"),
        (["publish", "jobs", "{}", "{bad json"], "argument 2: body is not JSON"),
        (["publish", "jobs", "1", "--header", "x"], "--header expects NAME=VALUE"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(apps, args, message):
    result = run(apps, *args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("consumerd: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_env_broker_url_is_validated_too(apps):
    result = run(apps, "check", "--app", "good", env={"CONSUMERD_BROKER": "bogus://"})
    assert result.returncode == 2
    assert "unknown broker scheme 'bogus'" in result.stderr


@pytest.mark.parametrize("command", ["run", "publish", "check", "health"])
def test_every_command_reads_and_checks_the_environment(apps, command):
    # The retired name would have sent messages to another broker without a word.
    args = {"publish": ["q", "{}"], "health": ["--pidfile", "x.pid"]}.get(
        command, ["--app", "good"]
    )
    result = run(apps, command, *args, env={"CONSUMERD_BROKER_URL": "redis://127.0.0.1:6379/0"})
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "consumerd: error: $CONSUMERD_BROKER_URL: unknown setting (did you mean $CONSUMERD_BROKER?)"
    ]


def test_publish_obeys_the_broker_run_reads(apps, name):
    check_broker(REDIS_URL)
    import redis

    client = redis.Redis()
    try:
        result = run(apps, "publish", name, '{"a": 1}', env={"CONSUMERD_BROKER": REDIS_URL})
        assert result.returncode == 0, result.stderr
        assert client.llen(name) == 1
        assert not (apps / ".consumerd").exists(), "written to the embedded broker"
        assert f"published 1 message(s) to {name} on {REDIS_URL}" in result.stderr
    finally:
        client.delete(name)


def test_check_uses_the_environment_s_worker_count(apps):
    result = run(apps, "check", "--app", "good", env={"CONSUMERD_WORKERS": "3"})
    assert result.returncode == 0, result.stderr
    assert "3 worker(s)" in result.stdout
    assert "worker 2 (global 2/3): p2" in result.stdout


def test_check_into_a_closed_pipe_exits_quietly(apps):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before consumerd writes: `... | head -0`
    environ = dict(os.environ, PYTHONPATH=f"{ROOT}:{apps}")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "consumerd.cli", "check", "--app", "good"],
            cwd=apps,
            env=environ,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141  # as a shell reports a tool ended by SIGPIPE


def test_version_comes_from_the_package_metadata(apps):
    from importlib.metadata import version

    import consumerd

    assert consumerd.__version__ == version("consumerd")
    result = run(apps, "--version")
    assert (result.returncode, result.stdout) == (0, f"consumerd {version('consumerd')}\n")


@pytest.mark.parametrize("command", [[], ["run"], ["publish"], ["check"], ["health"]])
def test_help_is_written_for_a_terminal(apps, command):
    result = run(apps, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: consumerd" in result.stdout
    assert "`" not in result.stdout  # no reStructuredText markup
    if command == ["run"]:
        assert "--max-messages-per-worker N" in result.stdout
        assert "SIGHUP applies a change" in result.stdout


def test_check_prints_consumers_queues_and_map_without_a_broker(apps):
    result = run(
        apps,
        "check",
        "--app",
        "good",
        "--workers",
        "2",
        "--member",
        "1/2",
        "--broker",
        "redis://127.0.0.1:1/0",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "consumer jobs: handler handle" in out
    assert "queues: jobs.p0, jobs.p1, jobs.p2, jobs.p3" in out
    assert "retry: jobs.retry  dead letters: jobs.dlq" in out
    assert "worker 0 (global 2/4): p2" in out
    assert "worker 1 (global 3/4): p3" in out


def test_check_names_the_embedded_default(apps):
    result = run(apps, "check", "--app", "good")
    assert result.returncode == 0
    assert f"sqlite:///{apps}/.consumerd/broker.db" in result.stdout


def test_master_does_not_import_kombu(apps):
    code = (
        "import sys\nfrom consumerd import cli\nfrom consumerd.consumer import loading, "
        "service\nloading.load_app('good')\nassert 'kombu' not in sys.modules, 'kombu'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=apps,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}:{apps}"),
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_publish_from_the_shell_routes_like_the_app(apps, name):
    check_broker(REDIS_URL)
    import redis

    client = redis.Redis()
    try:
        result = run(
            apps,
            "publish",
            "--app",
            "good",
            "--broker",
            REDIS_URL,
            name,
            '{"a": 1}',
            '{"a": 2}',
            "--key",
            "resource-42",
            env={"T_JOBS": name},
        )
        assert result.returncode == 0, result.stderr
        from consumerd.consumer.routing import partition_of

        queue = f"{name}.p{partition_of('resource-42', 4)}"
        assert client.llen(queue) == 2
        lines = "\n".join(json.dumps({"n": n}) for n in range(5))
        result = run(apps, "publish", "--broker", REDIS_URL, f"{name}.plain", stdin=lines)
        assert result.returncode == 0, result.stderr
        assert client.llen(f"{name}.plain") == 5
    finally:
        client.delete(f"{name}.plain", *(f"{name}.p{p}" for p in range(4)))


def test_pidfile_is_written_guarded_and_removed(apps):
    import signal
    import time

    pidfile = apps / "consumerd.pid"
    environ = dict(os.environ, PYTHONPATH=f"{ROOT}:{apps}")
    environ.pop("CONSUMERD_BROKER", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumerd.cli", "--app", "good", "--pidfile", str(pidfile)],
        cwd=apps,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "pidfile not written"
            time.sleep(0.02)
        assert int(pidfile.read_text()) == proc.pid
        second = run(apps, "--app", "good", "--pidfile", str(pidfile))
        assert second.returncode == 2
        assert f"consumerd already runs as pid {proc.pid}" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not pidfile.exists()


def test_publish_to_an_unreachable_broker_is_one_line_exit_1(apps):
    result = run(apps, "publish", "--broker", "redis://127.0.0.1:1/0", "q", "{}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "publish to redis://127.0.0.1:1/0 failed: 0 of 1 message(s) confirmed" in lines[0]
    assert "to send again: argument(s) 1: " in lines[0]


def test_a_metrics_port_in_use_is_one_line_and_exit_2(apps):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run(apps, "--app", "good", "--metrics-port", str(port))
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"consumerd: error: --metrics-address 127.0.0.1 --metrics-port {port}: "
        "cannot listen: Address already in use"
    ], result.stderr
