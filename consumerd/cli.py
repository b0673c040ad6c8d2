"""The ``consumerd`` command: run an app's consumers, publish a message, check an app.

``consumerd --app myapp.consumers --workers 4`` (or ``consumerd run ...``) runs the
consumers in supervised worker processes; ``consumerd publish NAME BODY`` sends a message;
``consumerd check --app ...`` prints the consumers, queues and partition → worker map
without connecting. Any usage error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import typing

from consumerd.consumer import broker, loading, routing
from consumerd.consumer.app import App
from consumerd.ops import config, endpoints, logs, metrics

LOG = logging.getLogger("consumerd")
EXIT_USAGE = 2
COMMANDS = ("run", "publish", "check", "health")


class UsageError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


class Failure(Exception):
    """A command that could not do its job (e.g. broker unreachable): one line, status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def _common(parser: argparse.ArgumentParser, app_required: bool) -> None:
    parser.add_argument("--app", required=app_required, metavar="MODULE[:ATTR]",
                        help="the module holding the App (attribute defaults to 'app')")
    parser.add_argument("--broker", metavar="URL",
                        help="broker URL (default: $CONSUMERD_BROKER_URL, the app's broker, "
                             "then the embedded SQLite broker in ./.consumerd/)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        type=str.upper)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consumerd", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = commands.add_parser("run", help="run the app's consumers (the default command)")
    # Every run option comes from consumerd.ops.config: command line > CONSUMERD_* > TOML.
    config.add_arguments(run)

    publish = commands.add_parser("publish", help="publish JSON messages")
    _common(publish, app_required=False)
    publish.add_argument("name", help="consumer (or plain queue) name")
    publish.add_argument("body", nargs="*",
                         help="JSON bodies; none or '-' reads one JSON body per stdin line")
    publish.add_argument("--key", help="partition key")
    publish.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")

    check = commands.add_parser("check", help="print consumers, queues and partition map")
    _common(check, app_required=True)
    check.add_argument("--workers", type=config.argument_type("workers"), default=1,
                       metavar="N")
    check.add_argument("--member", type=config.argument_type("member"), default=(0, 1),
                       metavar="I/M")
    health = commands.add_parser("health", help="exit 0 if the master and its workers run")
    health.add_argument("--pidfile", required=True, metavar="PATH",
                        help="the --pidfile the master was started with")
    health.add_argument("--log-level", default="WARNING", type=str.upper)
    return parser


def _broker_url(explicit: str | None, app: App | None) -> str:
    url = broker.resolve_url(explicit, app.broker if app else None)
    try:
        broker.validate(url)
    except broker.BrokerURLError as exc:
        raise UsageError(str(exc)) from None
    return url


def _load(ref: str) -> App:
    try:
        return loading.load_app(ref)
    except loading.AppLoadError as exc:
        raise UsageError(str(exc)) from None


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
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"--pidfile {path}: {exc.strerror}") from None
    master = os.getpid()
    try:
        yield
    finally:
        if os.getpid() == master:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _run(args: argparse.Namespace) -> None:
    from consumerd.consumer.service import ConsumerService  # noqa: PLC0415 - keeps check fast
    from consumerd.consumer.settings import Settings  # noqa: PLC0415
    from consumerd.supervisor import ServiceManager  # noqa: PLC0415

    options = {k: v for k, v in vars(args).items() if k not in ("command",)}
    try:
        running = config.Config(options)
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    s = running.settings
    logs.configure(s.log_level, s.log_format)
    if s.app is None:
        raise UsageError("--app is required (or CONSUMERD_APP, or app = ... in --config)")
    # Before the app is imported and before any fork: metrics the app defines count too.
    master_metrics = metrics.enable() if s.metrics_port is not None else None
    app = _load(s.app)
    url = _broker_url(s.broker, app)
    if s.broker is None and broker.is_default(url):
        LOG.info("no broker configured: using the embedded broker %s", url)
    settings = Settings(
        app_ref=s.app, broker_url=url, workers=s.workers, member=s.member,
        prefetch=s.prefetch, graceful_timeout=s.graceful_timeout,
        broker_down_limit=s.broker_down_limit, queues=s.queues,
        max_messages_per_worker=s.max_messages_per_worker,
        max_memory_per_worker=s.max_memory_per_worker, options=options,
    )
    LOG.info("app %s: %d worker(s), consumers %s, broker %s", app.name, s.workers,
             ", ".join(app.consumers), broker.redact(url))
    with _pidfile(s.pidfile):
        manager = ServiceManager(graceful_shutdown_timeout=s.graceful_timeout)
        service_id = manager.add(ConsumerService, workers=s.workers,
                                 kwargs={"settings": settings})
        manager.register_hooks(on_new_worker=logs.on_new_worker)
        if master_metrics is not None:
            master_metrics.name_service(service_id, ConsumerService.name or "consumer")
            master_metrics.follow(manager)
            manager.register_hooks(on_new_worker=metrics.on_new_worker,
                                   on_dead_worker=master_metrics.worker_died,
                                   on_terminate=master_metrics.stopping)
            endpoints.serve(
                manager, s.metrics_address, typing.cast(int, s.metrics_port), master_metrics,
                expected_workers=manager.expected_workers,
                before_scrape=lambda: master_metrics.set_backoff(manager.respawn_backoff()),
            )

        def on_reload() -> None:
            try:
                change = running.reload()
            except config.ConfigError as exc:
                LOG.error("reload: configuration rejected, the running one stays: %s", exc)
                return
            fresh = running.settings
            if "workers" in change.applied:
                manager.reconfigure(service_id, fresh.workers)
            if {"log_level", "log_format"} & change.applied.keys():
                logs.configure(fresh.log_level, fresh.log_format)
            for name, (old, new) in change.needs_restart.items():
                LOG.warning("reload: %s changed from %r to %r; applies at the next restart",
                            name, old, new)
            if change.applied:
                LOG.info("reload: applied %s", ", ".join(sorted(change.applied)))

        manager.register_hooks(on_reload=on_reload)
        manager.run()


# -- publish ------------------------------------------------------------------------------


def _bodies(args: argparse.Namespace) -> typing.Iterator[typing.Any]:
    texts: typing.Iterable[str] = args.body
    if not args.body or args.body == ["-"]:
        texts = (line for line in sys.stdin if line.strip())
    for text in texts:
        try:
            yield json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"body is not JSON ({exc}): {text.strip()[:80]!r}") from None


def _headers(pairs: list[str]) -> dict[str, str] | None:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--header expects NAME=VALUE, got {pair!r}")
        headers[name] = value
    return headers or None


def _publish(args: argparse.Namespace) -> None:
    app = _load(args.app) if args.app else App("consumerd-publish")
    app.configure(broker_url=_broker_url(args.broker, app))
    headers = _headers(args.header)
    count = 0
    try:
        for body in _bodies(args):
            queue = app.publish(args.name, body, key=args.key, headers=headers)
            count += 1
    except UsageError:
        raise
    except Exception as exc:
        raise Failure(f"publish to {broker.redact(app.broker_url)} failed after {count} "
                      f"message(s): {type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            app.close()
    if count:
        LOG.info("published %d message(s) to %s", count, queue)


# -- health -------------------------------------------------------------------------------


def _health(args: argparse.Namespace) -> None:
    from consumerd import health  # noqa: PLC0415 - keeps the other commands lean

    try:
        print(health.check(args.pidfile))
    except health.Unhealthy as exc:
        print(f"consumerd: unhealthy: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


# -- check --------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    app = _load(args.app)
    url = _broker_url(args.broker, app)
    index, members = args.member
    total = members * args.workers
    out = [f"app {app.name!r}, broker {broker.redact(url)}, "
           f"{args.workers} worker(s), member {index}/{members}"]
    for spec in app.consumers.values():
        retry = spec.retry
        out.append(f"consumer {spec.name}: handler {getattr(spec.handler, '__qualname__', '?')}, "
                   f"prefetch {app.prefetch_of(spec)}, retries {retry.max_retries} "
                   f"(delay {retry.delay:g}s, max {retry.max_delay:g}s)")
        out.append(f"  queues: {', '.join(spec.queue_names)}")
        out.append(f"  retry: {routing.retry_queue(spec.name)}  "
                   f"dead letters: {routing.dead_letter_queue(spec.name)}")
        if spec.partitions:
            for worker in range(args.workers):
                me = routing.global_worker(worker, args.workers, index)
                mine = routing.owned_partitions(spec.partitions, me, total)
                shown = ", ".join(f"p{p}" for p in mine) or "(none)"
                out.append(f"  worker {worker} (global {me}/{total}): {shown}")
    print("\n".join(out))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")  # `consumerd --app x` means `consumerd run --app x`
    try:
        args = _build_parser().parse_args(argv)
        logs.configure(getattr(args, "log_level", None) or "INFO")
        commands = {"run": _run, "publish": _publish, "check": _check, "health": _health}
        commands[args.command](args)
    except UsageError as exc:
        print(f"consumerd: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except Failure as exc:
        print(f"consumerd: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
