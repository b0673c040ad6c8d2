"""Every fenced code block of README.md runs as pasted (issue #10).

The blocks are read from README.md at test time (no copy is kept here) and each is run
the way its language and content call for:

* ``python``: a block whose first line names a file (``# myapp/consumers.py``) is that
  file of the reader's app: it is written to that path in a temp dir, imported, and
  ``consumerd check``-ed. A supervisor example (``ServiceManager(...).run()``) runs for
  ever: it is started, watched until every worker_id prints, sent SIGHUP when it
  registers a reload hook (the reconfigured worker count must then print), and stopped
  with SIGTERM, which must exit 0. Any other block runs as a script and must exit 0.
* ``sh``/``bash``/``shell``/``console``: run by ``sh`` in a temp copy of the repository
  (a fresh working directory, so no ``.consumerd/`` of an earlier run), with the README's
  file blocks written into it, inside a throwaway virtualenv (``--system-site-packages``,
  so dependencies need no download, and so ``pip install -e .`` installs the copy into
  the venv instead of re-pointing the shared interpreter's install). ``pip install``
  runs as written. A block that starts the runtime (``consumerd --app …``) runs for
  ever: once the messages it publishes are handled (read from its log) its master gets
  SIGTERM, and the block must exit 0 with nothing left in the queue.
* ``toml``: parsed by the project's config loader; ``yaml``: parsed (every document);
  ``ini`` (systemd units): parsed; ``dockerfile``: every instruction known, exec forms
  valid JSON, ``FROM`` first.

A block tagged with any other language fails the test (give it a runner here); blocks
without a tag (the CLI synopsis) or tagged ``text`` are output, not code.

Deviations from "as pasted", each forced by where the tests run and each stated where it
happens: ``python3 -m pytest`` only collects (running the whole suite from inside itself
would recurse); a broker URL naming a host that does not resolve here (``rabbit``) is
pointed at the local RabbitMQ, in a throwaway vhost; ``PYTHONUNBUFFERED=1`` stands for the
terminal the reader would see output on (a pipe would hold it in a buffer).
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"python", "sh", "bash", "shell", "console", "toml", "ini", "yaml", "dockerfile"}
NOT_CODE = {"", "text"}
FILE_HEADER = re.compile(r"#\s*([\w./-]+\.py)\s*$")
CONSUMERD = shutil.which("consumerd") or "consumerd"
LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672"
DOCKERFILE_INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    line: int
    """Line of the opening fence in README.md."""
    text: str

    def __str__(self) -> str:
        return f"README.md:{self.line}:{self.lang}"

    @property
    def file(self) -> str | None:
        """The path a python block says it is (``# myapp/consumers.py``), if any."""
        first = self.text.splitlines()[0] if self.text else ""
        found = FILE_HEADER.match(first) if self.lang == "python" else None
        return found.group(1) if found else None


def readme_blocks() -> list[Block]:
    blocks = []
    lines = README.read_text().splitlines()
    start: int | None = None
    lang = ""
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^```\s*(\S*)\s*$", line)
        if not fence:
            continue
        if start is None:
            start, lang = number, fence.group(1).lower()
        else:
            blocks.append(Block(lang, start, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    assert start is None, f"README.md line {start}: a code fence is never closed"
    return blocks


BLOCKS = readme_blocks()
CODE = [b for b in BLOCKS if b.lang in RUNNABLE]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a reader: none of the test run's consumerd settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CONSUMERD_") and k != "PYTHONPATH"
    }
    env.update(PYTHONUNBUFFERED="1", **extra)  # a terminal shows output line by line
    return env


class Output:
    """A child's stdout+stderr, collected by a thread so the child never blocks on it."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True
        )
        self._thread.start()

    def text(self) -> str:
        return "".join(self.lines)

    def __str__(self) -> str:
        return self.text()[-4000:]


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry))
    return found


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@contextlib.contextmanager
def running(argv: list[str], **kwargs: object) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    """A child in its own session; whatever is left of the session is killed at the end."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,  # type: ignore[call-overload]
    )
    out = Output(proc)
    try:
        yield proc, out
    finally:
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


# -- the test ---------------------------------------------------------------------------


def test_readme_blocks_are_all_known_kinds() -> None:
    unknown = [
        f"README.md line {b.line}: ```{b.lang}" for b in BLOCKS if b.lang not in RUNNABLE | NOT_CODE
    ]
    assert not unknown, f"no runner for these blocks (add one to {__name__}): {unknown}"
    assert len(CODE) >= 6, "README.md lost its code blocks?"


@pytest.mark.parametrize("block", CODE, ids=str)
def test_block_runs_as_pasted(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    runner = runner_for(block)
    try:
        runner(block, tmp_path, request)
    except (AssertionError, subprocess.SubprocessError, OSError, ValueError) as exc:
        pytest.fail(
            f"README.md line {block.line} ({block.lang} block, {runner.__name__}): "
            f"{type(exc).__name__}: {exc}"
        )


Runner = Callable[[Block, Path, pytest.FixtureRequest], None]


def runner_for(block: Block) -> Runner:
    if block.lang == "python":
        if block.file:
            return run_app_file
        if "ServiceManager(" in block.text and ".run()" in block.text:
            return run_supervisor_example
        return run_script
    if block.lang in ("sh", "bash", "shell", "console"):
        return run_shell
    return {
        "toml": parse_toml,
        "yaml": parse_yaml,
        "ini": parse_ini,
        "dockerfile": parse_dockerfile,
    }[block.lang]


# -- python -------------------------------------------------------------------------------


def run_script(block: Block, tmp: Path, _: pytest.FixtureRequest) -> None:
    (tmp / "block.py").write_text(block.text)
    done = subprocess.run(  # noqa: PLW1510 - the status is checked below, with the output
        [sys.executable, "block.py"],
        cwd=tmp,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def run_app_file(block: Block, tmp: Path, _: pytest.FixtureRequest) -> None:
    """The reader's app module: it imports (on the embedded broker, in a fresh working
    directory: the block may publish at import) and ``consumerd check`` accepts it,
    listing every consumer the block declares."""
    assert block.file is not None
    path = tmp / block.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.text)
    module = block.file.removesuffix(".py").replace("/", ".")
    env = clean_env(PYTHONPATH=str(ROOT))
    imported = subprocess.run(  # noqa: PLW1510
        [sys.executable, "-c", f"import {module}"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    check = subprocess.run(  # noqa: PLW1510
        [CONSUMERD, "check", "--app", module, "--workers", "2"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    declared = len(re.findall(r"@\w+\.(?:consumer|notifications)\(", block.text))
    listed = len(re.findall(r"^consumer ", check.stdout, re.MULTILINE))
    assert listed == declared, f"declared {declared} consumers, check lists:\n{check.stdout}"


def run_supervisor_example(block: Block, tmp: Path, _: pytest.FixtureRequest) -> None:
    (tmp / "example.py").write_text(block.text)
    workers = int(re.search(r"workers=(\d+)", block.text).group(1))  # type: ignore[union-attr]
    args = ast.literal_eval(re.search(r"args=(\(.*?\))", block.text).group(1))  # type: ignore[union-attr]
    greeting = args[0]
    with running([sys.executable, "example.py"], cwd=tmp, env=clean_env(PYTHONPATH=str(ROOT))) as (
        proc,
        out,
    ):

        def printed(count: int) -> bool:
            seen = set(out.text().splitlines())
            return all(f"{greeting} {i}" in seen for i in range(count))

        try:
            wait_for(lambda: printed(workers), 30, f"'{greeting} <id>' from {workers} workers")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its output:\n{out}") from None
        reconfigured = re.search(r"on_reload=.*reconfigure\(\w+, (\d+)\)", block.text)
        if reconfigured:
            proc.send_signal(signal.SIGHUP)
            more = int(reconfigured.group(1))
            wait_for(lambda: printed(more), 30, f"{more} workers after SIGHUP")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, out
        wait_for(lambda: not session_pids(proc.pid), 10, "every worker gone")


# -- shell ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway virtualenv over the interpreter's packages: ``pip install -e .`` in a
    block installs into it, not into the interpreter other work shares."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True, timeout=120
    )
    return path


@pytest.fixture(scope="module")
def rabbit_vhost() -> Iterator[str]:
    """A vhost of the local RabbitMQ that exists for this module only."""
    name = f"consumerd-readme-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, timeout=60)
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            check=True,
            timeout=60,
        )
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, timeout=60)


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True


def local_broker(script: str, request: pytest.FixtureRequest) -> str:
    """An AMQP URL whose host does not resolve here (the reader's ``rabbit``) becomes
    the local RabbitMQ, in a vhost of its own: the closest real thing."""

    def swap(match: re.Match[str]) -> str:
        host = urllib.parse.urlsplit(match.group(0)).hostname or ""
        if resolves(host):
            return match.group(0)
        vhost = request.getfixturevalue("rabbit_vhost")
        return f"{LOCAL_AMQP}/{vhost}"

    return re.sub(r"amqps?://\S+", swap, script)


def shell_script(block: Block) -> str:
    if block.lang != "console":
        return block.text
    # Only the prompted lines are commands; the others show their output.
    return "".join(line[2:] + "\n" for line in block.text.splitlines() if line.startswith("$ "))


RUNS_FOREVER = re.compile(r"\bconsumerd\s+(?:run\s+)?--app\s+(\S+)")


def run_shell(block: Block, tmp: Path, request: pytest.FixtureRequest) -> None:
    venv = request.getfixturevalue("venv")
    repo = tmp / "repo"
    shutil.copytree(
        ROOT,
        repo,
        ignore=shutil.ignore_patterns(
            ".git", ".consumerd", "__pycache__", ".venv", "*.egg-info", ".*_cache", "build", "dist"
        ),
    )
    for other in BLOCKS:  # the reader's files the README shows (e.g. telemetry.py)
        if other.file:
            (repo / other.file).parent.mkdir(parents=True, exist_ok=True)
            (repo / other.file).write_text(other.text)
    script = local_broker(shell_script(block), request)
    collect_only = bool(re.search(r"\bpytest\s*$", script, re.MULTILINE))
    if collect_only:
        # The whole suite from inside the suite would recurse (and take many minutes):
        # run the command as written, but only to collect (every test module imports).
        script = re.sub(r"\bpytest\s*$", "pytest --collect-only -q", script, flags=re.MULTILINE)
    env = clean_env(PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv))
    if "pip install" not in script:
        # Nothing installs here: the repository stands installed, as the first block did.
        env["PYTHONPATH"] = str(repo)
    forever = RUNS_FOREVER.search(script)
    if not forever:
        done = subprocess.run(  # noqa: PLW1510
            ["sh", "-ec", script],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if collect_only:
            assert re.search(r"^\d+ tests? collected", done.stdout, re.MULTILINE), done.stdout
            assert "error" not in done.stdout.splitlines()[-1].lower(), done.stdout[-3000:]
        return
    run_consumers(script, forever.group(1), repo, env)


def published(script: str) -> list[tuple[str, object]]:
    """(queue, body) of every message ``consumerd publish`` sends in ``script``."""
    found = []
    for command in re.split(r"&&|;|\n", script):
        words = shlex.split(command)
        if words[:2] != ["consumerd", "publish"]:
            continue
        rest = words[2:]
        positional = []
        while rest:
            word = rest.pop(0)
            if word.startswith("--"):
                if "=" not in word:
                    rest.pop(0)
                continue
            positional.append(word)
        queue, *bodies = positional
        found += [(queue, json.loads(b)) for b in bodies]
    return found


def notification_for(module: str, repo: Path) -> tuple[str, str, dict[str, object], str]:
    """(exchange, routing key, body, text the handler prints) for the first notification
    consumer of the app in ``module``: the block publishes nothing, so the test does."""
    sys.path.insert(0, str(repo))
    try:
        app = importlib.import_module(module).app
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop(module, None)
    listener = next(s.source for s in app.consumers.values() if s.source is not None)
    pattern = listener.event_types[0] if listener.event_types else "test.event"
    event_type = pattern.replace("*", "readme.test")
    message = {
        "message_id": uuid.uuid4().hex,
        "publisher_id": "compute.readme",
        "event_type": event_type,
        "priority": listener.priorities[0].upper(),
        "payload": {"readme": True},
        "timestamp": "2026-01-01 00:00:00.000000",
    }
    body = {"oslo.version": "2.0", "oslo.message": json.dumps(message)}
    key = f"{listener.topic}.{listener.priorities[0]}"
    return listener.exchanges[0], key, body, f"{event_type} {listener.priorities[0]}"


def run_consumers(script: str, module: str, repo: Path, env: dict[str, str]) -> None:
    """A block that starts the runtime: wait until its messages are handled, SIGTERM the
    master, and check the outcome."""
    messages = published(script)
    broker_url = re.search(r"--broker\s+(\S+)", script)
    with running(["sh", "-ec", script], cwd=repo, env=env) as (shell, out):
        if messages:
            # The example app logs each body it handles.
            expected = [str(body) for _, body in messages]
            wait_for(
                lambda: all(e in out.text() for e in expected),
                60,
                f"{expected} handled, in the log:\n{out}",
            )
        else:
            exchange, key, body, shown = notification_for(module, repo)
            assert broker_url, "a block running a notification agent names its broker"
            from kombu import Connection

            workers = int(re.search(r"--workers\s+(\d+)", script).group(1))  # type: ignore[union-attr]
            wait_for(
                lambda: out.text().count("consuming ") >= workers,
                60,
                f"{workers} workers consuming:\n{out}",
            )
            with Connection(broker_url.group(1)) as conn:
                conn.Producer().publish(
                    body, exchange=exchange, routing_key=key, serializer="json", retry=True
                )
            wait_for(lambda: shown in out.text(), 60, f"{shown!r} printed:\n{out}")
        # By now the block's last command, the runtime, is all that runs: the shell's
        # child, or the shell itself if it exec'd it.
        children = [p for p in session_pids(shell.pid) if parent_of(p) == shell.pid]
        assert len(children) <= 1, f"more than the runtime still runs: {children}"
        os.kill(children[0] if children else shell.pid, signal.SIGTERM)
        assert shell.wait(60) == 0, f"exit status {shell.returncode}:\n{out}"
        wait_for(lambda: not session_pids(shell.pid), 10, "every process of the block gone")
    if messages and not broker_url:
        # The embedded broker in the working directory: nothing left unacked or waiting.
        db = repo / ".consumerd" / "broker.db"
        with contextlib.closing(sqlite3.connect(db)) as conn:
            queues = sorted({q for q, _ in messages})
            left = conn.execute(
                f"SELECT COUNT(*) FROM messages WHERE queue IN ({','.join('?' * len(queues))})",
                queues,
            ).fetchone()[0]
        assert left == 0, f"{left} message(s) left in {queues}"
        handled = [
            line
            for line in out.text().splitlines()
            if any(str(body) in line for _, body in messages)
        ]
        assert len(handled) == len(messages), f"handled twice or more:\n{handled}"


# -- configuration and deployment files ----------------------------------------------------


def parse_toml(block: Block, tmp: Path, _: pytest.FixtureRequest) -> None:
    from consumerd import config

    path = tmp / "consumerd.toml"
    path.write_text(block.text)
    settings = config.read_file(str(path))
    assert settings, "no settings in the block"


def parse_yaml(block: Block, _tmp: Path, _: pytest.FixtureRequest) -> None:
    import yaml

    documents = [d for d in yaml.safe_load_all(block.text) if d is not None]
    assert documents, "no YAML document in the block"


def parse_ini(block: Block, _tmp: Path, _: pytest.FixtureRequest) -> None:
    # systemd units repeat keys (Environment=, ExecStartPre=) and use % specifiers.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(block.text)
    assert parser.sections(), "no [Section] in the block"


def parse_dockerfile(block: Block, _tmp: Path, _: pytest.FixtureRequest) -> None:
    # No Docker engine here: the instructions are checked; tests/container/ runs what
    # the project's Dockerfiles do.
    text = re.sub(r"\\\n", " ", block.text)
    instructions = [
        line.split(None, 1)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions and instructions[0][0].upper() in ("FROM", "ARG"), "FROM comes first"
    for words in instructions:
        keyword = words[0].upper()
        assert keyword in DOCKERFILE_INSTRUCTIONS, f"unknown instruction {words[0]}"
        argument = words[1] if len(words) > 1 else ""
        if keyword == "HEALTHCHECK":
            argument = argument[argument.index("CMD") + 3 :].strip() if "CMD" in argument else ""
        if keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK") and argument.startswith("["):
            form = json.loads(argument)
            assert isinstance(form, list) and all(isinstance(a, str) for a in form), argument
    # What the README shows is a Dockerfile of the repository (comments aside), the one
    # tests/container/ builds and runs, so the two cannot drift apart.
    shown = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    shown = [line for line in shown if not line.startswith("#")]
    files = [p for p in ROOT.rglob("Dockerfile*") if ".git" not in p.parts]
    assert any(dockerfile_lines(p) == shown for p in files), (
        f"the block is none of {[str(p.relative_to(ROOT)) for p in files]}"
    )


def dockerfile_lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith("#")]
