"""The consumerd command: run an app's consumers, publish messages, check an app, health.

Every command reads the same configuration (consumerd.config: command line >
CONSUMERD_* environment > --config file > defaults), so `publish` writes to the broker
`run` reads. Options may come before or after the positional arguments. A usage error is
one line on stderr and exit status 2; a command that cannot do its job exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import subprocess
import sys
import tempfile
import typing

import consumerd
from consumerd import config
from consumerd.consumer import broker, deaths, loading, ownership, publishing, routing, sampling
from consumerd.consumer.app import App
from consumerd.ops import endpoints, logs, metrics, web

LOG = logging.getLogger("consumerd")
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool killed by SIGPIPE
#: Set in the environment of the child that checks a code reload (SIGUSR2) first: it
#: loads the configuration and the app as `run` would, then exits 0 instead of running.
PREFLIGHT_ENV = "CONSUMERD_PREFLIGHT"
PREFLIGHT_OK = "consumerd: pre-flight check passed"

#: Each command, its one-line help, and the settings it takes on the command line (every
#: command reads all settings from the environment and the file, and checks them).
COMMANDS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "run": ("run the app's consumers under a supervisor (the default command)", None),
    "publish": (
        "publish JSON messages to a consumer's queue",
        ("app", "broker", "log_level", "log_format"),
    ),
    "check": (
        "print the consumers, their queues and the partition to worker map, offline",
        ("app", "broker", "workers", "member", "queues", "log_level"),
    ),
    "health": (
        "exit 0 if the master in the pid file and a worker of it run",
        ("pidfile", "log_level"),
    ),
    "queues": (
        "per consumer: messages ready, unacked, waiting to retry, dead-lettered",
        ("app", "broker", "queues", "log_level"),
    ),
    "dlq": (
        "list, show, replay or purge a consumer's dead letters",
        ("app", "broker", "log_level"),
    ),
}

EPILOG = """\
examples:
  consumerd --app myapp.consumers --workers 4
  consumerd publish --app myapp.consumers orders '{"id": 1}' --key customer-7
  consumerd check --app myapp.consumers --workers 4
  consumerd health --pidfile /run/consumerd.pid
  consumerd queues --app myapp.consumers --watch
  consumerd dlq replay orders --app myapp.consumers --match 'Timeout'

Run 'consumerd COMMAND --help' for the options of a command."""


class UsageError(Exception):
    """A mistake on the command line or in the configuration: one line, exit status 2."""


class Failure(Exception):
    """A command that could not do its job (e.g. broker unreachable): one line, status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(
        prog="consumerd",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"consumerd {consumerd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, (summary, settings) in COMMANDS.items():
        commands[name] = sub.add_parser(name, help=summary, description=summary)
        config.add_arguments(commands[name], settings, reloads=name == "run")
    publish = commands["publish"]
    publish.add_argument("name", help="the consumer (or a plain queue) to publish to")
    publish.add_argument(
        "body", nargs="*", help="JSON bodies; none, or '-', reads one JSON body per stdin line"
    )
    publish.add_argument(
        "--key",
        help="partition key (a partitioned consumer's messages "
        "with one key go to one partition, in order)",
    )
    publish.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a message header (repeatable)",
    )
    from consumerd import admin  # noqa: PLC0415 - it imports this module

    admin.add_arguments(commands)
    return parser, commands


def _config(args: argparse.Namespace) -> config.Config:
    """The configuration from every layer, with logging set up as it says."""
    try:
        running = config.Config(vars(args))
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    logs.configure(running.settings.log_level, running.settings.log_format)
    return running


def _settings(args: argparse.Namespace) -> config.Settings:
    return _config(args).settings


def _broker_url(explicit: str | None, app: App | None) -> str:
    url = broker.resolve_url(explicit, app.broker if app else None)
    try:
        broker.validate(url)
    except broker.BrokerURLError as exc:
        raise UsageError(str(exc)) from None
    return url


def _check_embedded(url: str) -> None:
    """An embedded broker's file is configuration, not an outage: one that cannot be made,
    or is not ours, is refused here in one line, not by every worker in a crash loop."""
    if broker.validate(url) != "sqlite":
        return
    from consumerd.consumer.transport import store  # noqa: PLC0415 - no kombu in the master

    database = store.Store(broker.sqlite_path(url), broker.url_options(url))
    try:
        database.open()
    except store.DatabasePathError as exc:
        raise UsageError(str(exc)) from None
    finally:
        database.close()


def _load(settings: config.Settings) -> App:
    if settings.app is None:
        raise UsageError("--app is required (or $CONSUMERD_APP, or app = ... in --config)")
    try:
        app = loading.load_app(settings.app)
        loading.check_queues(app, settings.queues)
    except loading.AppLoadError as exc:
        raise UsageError(str(exc)) from None
    return app


# -- run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _pidfile(path: str | None) -> typing.Iterator[None]:
    if path is None:
        yield
        return
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        pid = int(f.read().strip() or 0)
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pass
            else:
                raise UsageError(f"--pidfile {path}: consumerd already runs as pid {pid}")
    try:
        # A fresh name (O_EXCL | O_NOFOLLOW, 0600) in the pid file's directory, then a
        # rename: in a shared directory a name planted by another user (a symlink to a
        # file of ours) is never written through.
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path))
        )
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"--pidfile {path}: {exc.strerror or exc}") from None
    master = os.getpid()
    try:
        yield
    finally:
        if os.getpid() == master:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _run(args: argparse.Namespace) -> None:
    from consumerd.consumer.service import ConsumerService  # noqa: PLC0415 - keeps check fast
    from consumerd.supervisor import ServiceManager  # noqa: PLC0415

    running = _config(args)
    s = running.settings
    preflight = os.environ.pop(PREFLIGHT_ENV, None) == "1"
    # Before the app is imported and before any fork: metrics the app defines count too.
    master_metrics = metrics.enable() if s.metrics_port is not None and not preflight else None
    app = _load(s)
    url = _broker_url(s.broker, app)
    _check_embedded(url)
    try:
        ownership.check_lease_root(url)
    except OSError as exc:
        raise UsageError(f"partition lease directory: {exc}") from None
    if preflight:
        # The code and the configuration load: the master may re-execute. Said on stdout
        # because an app calling os._exit(0) at import exits 0 as well.
        print(PREFLIGHT_OK)
        return
    with _pidfile(s.pidfile):
        manager = ServiceManager(graceful_shutdown_timeout=s.graceful_timeout)
        service_id = manager.add(ConsumerService, workers=s.workers, args=(running,))
        manager.register_hooks(on_new_worker=logs.on_new_worker)
        if master_metrics is not None:
            master_metrics.name_service(service_id, ConsumerService.name or "consumer")
            master_metrics.follow(manager)  # restarts: only deaths whose slot respawns
            manager.register_hooks(
                on_new_worker=metrics.on_new_worker,
                on_dead_worker=master_metrics.worker_died,
                on_terminate=master_metrics.stopping,
            )
            try:
                endpoints.serve(
                    manager,
                    s.metrics_address,
                    typing.cast(int, s.metrics_port),
                    master_metrics,
                    expected_workers=manager.expected_workers,
                    before_scrape=lambda: master_metrics.set_backoff(manager.respawn_backoff()),
                    web=_web(running, manager, master_metrics, app, url),
                )
            except OSError as exc:
                raise UsageError(
                    f"--metrics-address {s.metrics_address} --metrics-port "
                    f"{s.metrics_port}: cannot listen: {exc.strerror or exc}"
                ) from None

        def on_reload() -> None:
            # Runs before the workers get their SIGHUP; they re-read the same way, and a
            # worker forked later starts from these settings.
            try:
                change = running.reload(check=lambda s: loading.check_queues(app, s.queues))
            except (config.ConfigError, loading.AppLoadError) as exc:
                LOG.error("reload: configuration rejected, the running one stays: %s", exc)
                return
            fresh = running.settings
            if "workers" in change.applied:
                manager.reconfigure(service_id, fresh.workers)
            if {"log_level", "log_format"} & change.applied.keys():
                logs.configure(fresh.log_level, fresh.log_format)
            for name, (old, new) in change.needs_restart.items():
                LOG.warning(
                    "reload: %s changed from %r to %r; applies at the next restart", name, old, new
                )
            if change.applied:
                LOG.info("reload: applied %s", ", ".join(sorted(change.applied)))

        manager.register_hooks(on_reload=on_reload)
        manager.add_preflight(_preflight)
        if s.broker is None and broker.is_default(url):
            LOG.info("no broker configured: using the embedded broker %s", url)
        LOG.info(
            "app %s: %d worker(s), consumers %s, broker %s",
            app.name,
            s.workers,
            ", ".join(loading.select(app, s.queues).consumers),
            broker.redact(url),
        )
        manager.run()


def _web(
    running: config.Config,
    manager: web.Manager,
    master_metrics: metrics.MasterMetrics,
    app: App,
    url: str,
) -> web.Web:
    """The web page of this master (see consumerd.ops.web)."""
    s = running.settings
    # Only what `dlq` needs, as this master resolved it: the children read no file and
    # no other variable, so nothing else in them can differ or fail.
    env = {k: v for k, v in _child_env().items() if not k.startswith(config.ENV_PREFIX)}
    env.update(
        {
            config.env_name("app"): typing.cast(str, s.app),
            config.env_name("broker"): url,
            config.env_name("log_level"): s.log_level,
            sampling.LOCK_ENV: os.path.join(master_metrics.directory, sampling.LOCK),
        }
    )
    return web.Web(
        web.Site(
            manager=manager,
            metrics=master_metrics,
            app=app,
            broker=broker.redact(url),
            lease_root=ownership.lease_root(url),
            scope=deaths.scope_of(app.name, s.member[0]),
            queues=lambda: running.settings.queues,
            token=lambda: running.settings.admin_token,
            hosts=lambda: running.settings.web_hosts,
            command=web.dlq_command(),
            env=env,
        )
    )


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a command the master runs: its own, less its metrics."""
    env = dict(os.environ, **extra)
    for name in (metrics.DIR_ENV, metrics.OWNER_ENV):  # the master's metrics stay its own
        env.pop(name, None)
    return env


class _PreflightProcess(subprocess.Popen[bytes]):
    """The check child; it passes only if it exited 0 *and* said so on stdout (a file,
    so that an app printing much at import never blocks on a full pipe)."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str]) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in poll()
        super().__init__(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._out)

    def poll(self) -> int | None:
        code = super().poll()
        if code is not None and not self._out.closed:
            self._out.seek(0)
            said = self._out.read().decode(errors="replace").splitlines()[-1:]
            self._out.close()
            if code == 0 and said != [PREFLIGHT_OK]:
                LOG.error(
                    "pre-flight check: the new code ended the process with status 0 "
                    "before it loaded (sys.exit or os._exit at import?)"
                )
                self.returncode = code = 1
        return code


def _preflight(cwd: str) -> subprocess.Popen[bytes]:
    """Before a code reload: the same command line, from the directory the re-exec will
    use, in check-only mode (see PREFLIGHT_ENV). Its one-line error, if any, goes to the
    master's stderr."""
    env = _child_env(PWD=cwd, **{PREFLIGHT_ENV: "1"})
    return _PreflightProcess([sys.executable, *sys.orig_argv[1:]], cwd, env)


# -- publish ------------------------------------------------------------------------------


def _bodies(args: argparse.Namespace) -> tuple[list[typing.Any], str, list[int]]:
    """Every body, what they are (``line``, ``argument``) and the number of each. All
    are read and parsed before anything is published: one that is not JSON publishes
    nothing."""
    if not args.body or args.body == ["-"]:
        kind, given = "line", [(n, t) for n, t in enumerate(sys.stdin, 1) if t.strip()]
    else:
        kind, given = "argument", list(enumerate(args.body, 1))
    bodies = []
    for number, text in given:
        try:
            bodies.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{kind} {number}: body is not JSON ({exc}): {text.strip()[:80]!r}; "
                "nothing published"
            ) from None
    return bodies, kind, [number for number, _ in given]


def _headers(pairs: list[str]) -> dict[str, str] | None:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--header expects NAME=VALUE, got {pair!r}")
        headers[name] = value
    return headers or None


def _publish(args: argparse.Namespace) -> None:
    s = _settings(args)
    app = _load(s) if s.app else App("consumerd-publish")
    url = _broker_url(s.broker, app)
    app.configure(broker_url=url)
    headers = _headers(args.header)
    bodies, kind, numbers = _bodies(args)
    try:
        count = app.publish_many(args.name, bodies, key=args.key, headers=headers)
    except publishing.PublishError as exc:
        again = [numbers[p] for p in [*exc.unconfirmed, *range(exc.sent, len(bodies))]]
        raise Failure(
            f"publish to {broker.redact(url)} failed: {exc.confirmed} of {len(bodies)} "
            f"message(s) confirmed; not confirmed, to send again: {kind}(s) "
            f"{publishing.ranges(again)}: {exc.reason}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            app.close()
    if count:
        LOG.info("published %d message(s) to %s on %s", count, args.name, broker.redact(url))


# -- health -------------------------------------------------------------------------------


def _health(args: argparse.Namespace) -> None:
    from consumerd import health  # noqa: PLC0415 - keeps the other commands lean

    s = _settings(args)
    if s.pidfile is None:
        raise UsageError(
            "--pidfile is required (or $CONSUMERD_PIDFILE, or pidfile = ... in "
            "--config): the one the master was started with"
        )
    try:
        print(health.check(s.pidfile))
    except health.Unhealthy as exc:
        print(f"consumerd: unhealthy: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


# -- check --------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    s = _settings(args)
    app = loading.select(_load(s), s.queues)
    url = _broker_url(s.broker, app)
    index, members = s.member
    total = members * s.workers
    out = [
        f"app {app.name!r}, broker {broker.redact(url)}, "
        f"{s.workers} worker(s), member {index}/{members}"
    ]
    for spec in app.consumers.values():
        retry = spec.retry
        out.append(
            f"consumer {spec.name}: handler {getattr(spec.handler, '__qualname__', '?')}, "
            f"prefetch {app.prefetch_of(spec)}, retries {retry.max_retries} "
            f"(delay {retry.delay:g}s, max {retry.max_delay:g}s)"
        )
        out.append(f"  queues: {', '.join(spec.queue_names)}")
        out.append(
            f"  retry: {routing.retry_queue(spec.name)}  "
            f"dead letters: {routing.dead_letter_queue(spec.name)}"
        )
        if spec.partitions:
            for worker in range(s.workers):
                me = routing.global_worker(worker, s.workers, index)
                mine = routing.owned_partitions(spec.partitions, me, total)
                shown = ", ".join(f"p{p}" for p in mine) or "(none)"
                out.append(f"  worker {worker} (global {me}/{total}): {shown}")
    print("\n".join(out))


# -- main ---------------------------------------------------------------------------------


def _command(argv: list[str]) -> tuple[str, list[str]]:
    """The command named first (``run`` when the line starts with an option), and the rest."""
    if not argv or argv[0].startswith("-"):
        return "run", argv
    if argv[0] in COMMANDS:
        return argv[0], argv[1:]
    close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown command {argv[0]!r}{hint}; commands: {', '.join(COMMANDS)}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, commands = _build_parser()
        if argv and argv[0] in ("-h", "--help", "--version"):
            parser.parse_args(argv[:1])  # prints and exits
        name, rest = _command(argv)
        # Intermixed: `publish orders --key k '{"a": 1}'` puts options among positionals.
        args = commands[name].parse_intermixed_args(rest)
        from consumerd import admin  # noqa: PLC0415 - it imports this module

        {
            "run": _run,
            "publish": _publish,
            "check": _check,
            "health": _health,
            "queues": admin.queues,
            "dlq": admin.dlq,
        }[name](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except UsageError as exc:
        print(f"consumerd: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except Failure as exc:
        print(f"consumerd: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except BrokenPipeError:
        # `consumerd check | head -1`: the reader left; stop quietly like other Unix tools.
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_BROKEN_PIPE) from None


if __name__ == "__main__":
    # `python -m consumerd.cli`: run the importable module, so that commands defined in
    # other modules (consumerd.admin) raise the errors main() catches.
    from consumerd.cli import main as _main

    _main()
