"""The deployment files in deploy/: what each would run, run as far as this machine allows.

* ``kubernetes.yaml``: each pod's container command is evaluated by a real ``sh`` with the
  environment Kubernetes would give it (``POD_NAME`` from the downward API), a stand-in
  ``consumerd`` recording the argv it is exec'd with. The members must be distinct and
  cover 0..M-1 with M = replicas, and ``consumerd check`` given each pod's argv must map
  every partition to exactly one worker across pods. Pod 0's argv then runs for real and
  its probes' paths must answer on its metrics port.
* ``consumerd.service`` / ``consumerd-notify.service``: parsed, their ExecStart options
  known to ``consumerd run``, and checked by ``systemd-analyze verify`` (systemd 252 here:
  the ``Type=notify`` variant must pass, ``Type=notify-reload`` needs 253).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from consumerd.config import parse_member
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONSUMERD = shutil.which("consumerd") or "consumerd"
UNITS = ["consumerd.service", "consumerd-notify.service"]


def reader_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMERD_")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


# -- Kubernetes ---------------------------------------------------------------------------


def statefulset() -> dict:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert "Deployment" not in kinds, "pods of a Deployment have no ordinal for --member"
    (found,) = [d for d in documents if d["kind"] == "StatefulSet"]
    service = found["spec"]["serviceName"]
    assert any(
        d["kind"] == "Service"
        and d["metadata"]["name"] == service
        and d["spec"].get("clusterIP") == "None"
        for d in documents
    ), "headless Service"
    return found


def pod_argv(sts: dict, ordinal: int, tmp: Path) -> list[str]:
    """The argv consumerd is exec'd with in pod ``ordinal``, from a real ``sh``."""
    container = sts["spec"]["template"]["spec"]["containers"][0]
    pod_name = f"{sts['metadata']['name']}-{ordinal}"
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "HOSTNAME": pod_name}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name
        else:  # a secret: any value, what matters is where the command puts it
            env[var["name"]] = f"secret-{var['name']}"
    record = tmp / f"argv-{ordinal}.json"
    fake = tmp / "bin" / "consumerd"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'pid': os.getpid(), 'env': dict(os.environ)}},"
        f" open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    # The image's ENTRYPOINT is consumerd: a pod without `command` runs it with `args`.
    command = container.get("command") or ["consumerd"]
    pod = subprocess.Popen([*command, *container.get("args", [])], env=env)
    assert pod.wait(30) == 0
    seen = json.loads(record.read_text())
    # exec'd, not a child of the shell: consumerd is the container's PID 1 and gets the
    # kubelet's SIGTERM itself.
    assert seen["pid"] == pod.pid, "the container command must exec consumerd"
    return seen["argv"]


def test_each_pod_is_a_distinct_member_and_partitions_have_one_owner(tmp_path) -> None:
    sts = statefulset()
    replicas = sts["spec"]["replicas"]
    assert replicas >= 2
    argvs = [pod_argv(sts, i, tmp_path) for i in range(replicas)]
    members = [parse_member(option(a, "--member")) for a in argvs]
    assert sorted(members) == [(i, replicas) for i in range(replicas)], members
    workers = {option(a, "--workers") for a in argvs}
    assert len(workers) == 1, "every member must run the same --workers"

    # The partition map consumerd itself computes for each pod: one owner per partition.
    app = tmp_path / "app"
    (app / "myapp").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "partitioned.py", app / "myapp" / "consumers.py")
    owners: dict[str, list[str]] = {}
    for argv in argvs:
        check = subprocess.run(  # noqa: PLW1510
            [
                CONSUMERD,
                "check",
                "--app",
                option(argv, "--app"),
                "--workers",
                option(argv, "--workers"),
                "--member",
                option(argv, "--member"),
            ],
            cwd=app,
            env=reader_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        for line in check.stdout.splitlines():
            found = re.match(r"\s+worker \d+ \(global (\d+)/\d+\): (.*)", line)
            if found:
                for p in found.group(2).split(", "):
                    owners.setdefault(p, []).append(found.group(1))
    assert owners and all(len(o) == 1 for o in owners.values()), owners
    assert sorted(owners) == sorted(f"p{i}" for i in range(len(owners)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_pod_runs_and_its_probes_answer(tmp_path) -> None:
    sts = statefulset()
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    argv = pod_argv(sts, 0, tmp_path)
    assert option(argv, "--metrics-address") == "0.0.0.0"  # probes come from outside
    port = int(option(argv, "--metrics-port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = [container["livenessProbe"], container["readinessProbe"]]
    for probe in probes:
        assert ports[probe["httpGet"]["port"]] == port, probe
    assert pod["terminationGracePeriodSeconds"] > float(option(argv, "--graceful-timeout"))
    env = {e["name"] for e in container["env"]}
    assert "CONSUMERD_BROKER" in env and "CONSUMERD_BROKER_URL" not in env

    # Pod 0's argv for real, with the embedded broker standing in for the secret and a
    # free port for 9100 (this machine is shared).
    app = tmp_path / "app"
    (app / "myapp").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "partitioned.py", app / "myapp" / "consumers.py")
    local = free_port()
    argv = [str(local) if a == str(port) else a for a in argv]
    broker = f"sqlite:///{tmp_path}/broker.db"
    proc = subprocess.Popen(
        [CONSUMERD, *argv],
        cwd=app,
        env=reader_env(CONSUMERD_BROKER=broker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        liveness, readiness = (p["httpGet"]["path"] for p in probes)
        wait_for(lambda: get(local, liveness) == 200, 30, f"{liveness} answering 200")
        wait_for(lambda: get(local, readiness) == 200, 30, f"{readiness} answering 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- systemd ------------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_a_valid_consumerd_command(name: str) -> None:
    service = unit(name)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "consumerd"
    usage = subprocess.run(
        [CONSUMERD, "run", "--help"],
        env=reader_env(),
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    for flag in (a for a in argv[1:] if a.startswith("--")):
        assert f"{flag} " in usage, f"{flag} is not a consumerd run option"
    assert service["Environment"].startswith("CONSUMERD_BROKER="), service["Environment"]
    assert float(service["TimeoutStopSec"]) > float(option(argv, "--graceful-timeout"))
    assert service["KillMode"] == "mixed" and service["NotifyAccess"] == "all"


def test_notify_variant_reloads_with_sighup() -> None:
    service = unit("consumerd-notify.service")["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "ReloadSignal" not in service  # a notify-reload key (systemd >= 253)
    assert unit("consumerd.service")["Service"]["Type"] == "notify-reload"


def systemd_version() -> int:
    out = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_accepts_the_unit(name: str, tmp_path) -> None:
    # verify wants ExecStart's binary to exist: point it at the installed consumerd.
    text = (DEPLOY / name).read_text().replace("/usr/local/bin/consumerd", CONSUMERD)
    (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = done.stderr.strip()
    if unit(name)["Service"]["Type"] == "notify-reload" and systemd_version() < 253:
        assert "notify-reload" in complaints  # why consumerd-notify.service exists
    else:
        assert not complaints and done.returncode == 0, complaints
