"""The operator's commands: ``consumerd queues`` and ``consumerd dlq``.

Both read the configuration ``run`` reads (app, broker, queues) and talk to the broker
through :mod:`consumerd.consumer.inspection`. Usage errors (an unknown consumer, a bad
regular expression, no selector) are one line and exit status 2; a broker that cannot be
reached, or a dead letter that is not there, one line and exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
import time
import typing

from consumerd import cli
from consumerd.consumer import broker, inspection, loading, routing, sampling
from consumerd.consumer.app import App, ConsumerSpec

UNKNOWN = "?"

QUEUES_HELP = """\
columns:
  READY      messages waiting to be delivered
  UNACKED    delivered to a consumer (running or prefetched) and not settled yet
  RETRY      failed messages waiting for their next attempt in <name>.retry
  DEAD       dead letters in <name>.dlq (see 'consumerd dlq')
  CONSUMERS  consumers attached to the queue
  A partitioned consumer has a row per partition and a total row.

'?' marks a number the broker cannot tell, never a guessed 0:
  RabbitMQ  UNACKED while a consumer is attached: AMQP has no way to ask, only the
            management API (not used) or rabbitmqctl. RETRY shows "N+?" when retry
            copies may be held by a worker waiting for their time.
  Redis     CONSUMERS: Redis keeps no list of consumers (kombu consumers poll lists).
  embedded  CONSUMERS: the same, for the embedded broker's table.
"""

DLQ_HELP = """\
actions:
  list NAME               the dead letters of consumer NAME, oldest first: id, age,
                          attempts, the queue it failed on, the error
  show NAME ID            one in full: properties, headers, body
  replay NAME SELECTOR    move them back to the queue they failed on (a partition's own),
                          as first attempts (consumerd-attempt/-error/-retry-at dropped)
  purge NAME SELECTOR     delete them
SELECTOR: IDs, --match REGEX (searched in the error) or --all. --dry-run: print what
would be moved or deleted, and do nothing.

Every move is atomic per message (RabbitMQ: a channel transaction; Redis: one Lua
script; embedded: one SQLite transaction): a replay killed at any point neither loses
nor duplicates a message. A message's id is its message_id property, or 'sha-' and a
hash of its body when it has none.
"""


def add_arguments(commands: dict[str, argparse.ArgumentParser]) -> None:
    """The options of ``queues`` and ``dlq`` beyond the settings."""
    queues = commands["queues"]
    queues.epilog = QUEUES_HELP
    queues.formatter_class = argparse.RawDescriptionHelpFormatter
    queues.add_argument(
        "--watch",
        action="store_true",
        help="print again every --interval seconds until interrupted",
    )
    queues.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        metavar="S",
        help="seconds between two --watch samples (default 2)",
    )
    queues.add_argument(
        "--json", action="store_true", help="one JSON object (a line each sample with --watch)"
    )
    dlq = commands["dlq"]
    dlq.epilog = DLQ_HELP
    dlq.formatter_class = argparse.RawDescriptionHelpFormatter
    dlq.add_argument(
        "action", choices=("list", "show", "replay", "purge"), help="what to do (see below)"
    )
    dlq.add_argument("name", help="the consumer whose dead letters to work on")
    dlq.add_argument("ids", nargs="*", metavar="ID", help="message ids")
    dlq.add_argument(
        "--match", metavar="REGEX", help="the dead letters whose error matches (re.search)"
    )
    dlq.add_argument("--all", action="store_true", help="every dead letter")
    dlq.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be replayed or purged, change nothing",
    )
    dlq.add_argument("--json", action="store_true", help="list and show: JSON output")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds from 0.1 to 86400, got {text!r}")
    return value


@contextlib.contextmanager
def _inspector(url: str) -> typing.Iterator[inspection.Inspector]:
    try:
        inspector = inspection.open_inspector(url)
    except inspection.Unsupported as exc:
        raise cli.UsageError(str(exc)) from None
    except inspection.Unreachable as exc:
        raise cli.Failure(f"broker unreachable: {exc}") from None
    try:
        yield inspector
    except inspection.Unreachable as exc:
        raise cli.Failure(f"broker failed: {exc}") from None
    finally:
        inspector.close()


def _app_and_url(args: argparse.Namespace, *, select: bool) -> tuple[App, str]:
    s = cli._settings(args)
    app = cli._load(s)
    if select:
        app = loading.select(app, s.queues)
    return app, cli._broker_url(s.broker, app)


# -- queues -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
    consumer: str
    queue: str
    ready: int
    unacked: int | None
    consumers: int | None
    retry: tuple[int, int | None] | None = None  # ready, held
    dead: int | None = None


def _rows(app: App, inspector: inspection.Inspector) -> list[_Row]:
    names: list[str] = []
    for spec in app.consumers.values():
        names += [
            *spec.queue_names,
            routing.retry_queue(spec.name),
            routing.dead_letter_queue(spec.name),
        ]
    depths = inspector.depths(names)
    rows = []
    for spec in app.consumers.values():
        retry = depths[routing.retry_queue(spec.name)]
        dead = depths[routing.dead_letter_queue(spec.name)]
        # Nobody consumes a dead-letter queue; `consumerd dlq` holds some while it runs
        # (on RabbitMQ unseen: basic.get makes no consumer).
        dead_count = dead.ready + (dead.unacked or 0)
        mine = [depths[q] for q in spec.queue_names]
        parts = [
            _Row(spec.name, q, d.ready, d.unacked, d.consumers)
            for q, d in zip(spec.queue_names, mine, strict=True)
        ]
        total = _Row(
            spec.name,
            spec.name if len(parts) == 1 else f"{spec.name} (all)",
            sum(d.ready for d in mine),
            _sum(d.unacked for d in mine),
            _sum(d.consumers for d in mine),
            (retry.ready, retry.unacked),
            dead_count,
        )
        rows += [*parts, total] if len(parts) > 1 else [total]
    return rows


def _sum(values: typing.Iterable[int | None]) -> int | None:
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def _cell(value: int | None) -> str:
    return UNKNOWN if value is None else str(value)


def _retry_cell(retry: tuple[int, int | None] | None) -> str:
    if retry is None:
        return ""
    ready, held = retry
    if held is None:
        return f"{ready}+{UNKNOWN}"
    return str(ready + held)


def _table(rows: list[_Row]) -> str:
    header = ("CONSUMER", "QUEUE", "READY", "UNACKED", "RETRY", "DEAD", "CONSUMERS")
    lines = [header] + [
        (
            r.consumer,
            r.queue,
            str(r.ready),
            _cell(r.unacked),
            _retry_cell(r.retry),
            "" if r.dead is None else str(r.dead),
            _cell(r.consumers),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _report(
    app: App, url: str, inspector: inspection.Inspector, rows: list[_Row]
) -> dict[str, typing.Any]:
    consumers: dict[str, dict[str, typing.Any]] = {}
    for row in rows:
        entry = consumers.setdefault(row.consumer, {"consumer": row.consumer, "queues": []})
        if row.retry is None:
            entry["queues"].append(
                {
                    "queue": row.queue,
                    "ready": row.ready,
                    "unacked": row.unacked,
                    "consumers": row.consumers,
                }
            )
            continue
        if not entry["queues"]:  # one plain queue: the row is the queue and the total
            entry["queues"].append(
                {
                    "queue": row.queue,
                    "ready": row.ready,
                    "unacked": row.unacked,
                    "consumers": row.consumers,
                }
            )
        retry_ready, retry_held = row.retry
        entry.update(
            ready=row.ready,
            unacked=row.unacked,
            consumers=row.consumers,
            retry={"ready": retry_ready, "held": retry_held},
            dead=row.dead,
        )
    return {
        "time": round(time.time(), 3),
        "app": app.name,
        "broker": broker.redact(url),
        "kind": inspector.kind,
        "unknown": inspector.unknown,
        "consumers": list(consumers.values()),
    }


def _notes(inspector: inspection.Inspector, rows: list[_Row]) -> list[str]:
    shown = set()
    for row in rows:
        if row.unacked is None or (row.retry is not None and row.retry[1] is None):
            shown.add("unacked")
        if row.consumers is None:
            shown.add("consumers")
    return [f"? {field}: {why}" for field, why in inspector.unknown.items() if field in shown]


def queues(args: argparse.Namespace) -> None:
    app, url = _app_and_url(args, select=True)
    tty = sys.stdout.isatty()
    with _inspector(url) as inspector:
        while True:
            rows = _rows(app, inspector)
            if args.json:
                print(json.dumps(_report(app, url, inspector, rows)))
            else:
                if args.watch and tty:
                    print("\x1b[H\x1b[2J", end="")
                stamp = time.strftime(" at %H:%M:%S") if args.watch else ""
                print(f"app {app.name!r}, broker {broker.redact(url)}{stamp}")
                print(_table(rows))
                for note in _notes(inspector, rows):
                    print(note)
            if not args.watch:
                return
            sys.stdout.flush()
            try:
                time.sleep(args.interval)
            except KeyboardInterrupt:
                return


# -- dlq ----------------------------------------------------------------------------------


def _consumer(app: App, name: str) -> ConsumerSpec:
    spec = app.consumers.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, app.consumers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise cli.UsageError(
            f"app {app.name!r} declares no consumer {name!r}{hint}; "
            f"it declares {', '.join(app.consumers)}"
        )
    return spec


def _selector(args: argparse.Namespace) -> typing.Callable[[inspection.DeadLetter], bool]:
    given = [bool(args.ids), args.match is not None, args.all]
    if args.action in ("list", "show"):
        if args.match is not None or args.all or args.dry_run:
            raise cli.UsageError(f"dlq {args.action} takes no --match, --all or --dry-run")
        if args.action == "show" and len(args.ids) != 1:
            raise cli.UsageError("dlq show takes one ID")
        if args.action == "list" and args.ids:
            raise cli.UsageError("dlq list takes no ID (see dlq show)")
        wanted = set(args.ids)
        return lambda letter: not wanted or letter.id in wanted
    if sum(given) != 1:
        raise cli.UsageError(f"dlq {args.action} needs exactly one of: IDs, --match REGEX, --all")
    if args.json:
        raise cli.UsageError("--json is for dlq list and dlq show")
    if args.all:
        return lambda letter: True
    if args.match is not None:
        try:
            pattern = re.compile(args.match)
        except re.error as exc:
            raise cli.UsageError(f"--match {args.match!r}: bad regular expression: {exc}") from None
        return lambda letter: pattern.search(letter.error) is not None
    wanted = set(args.ids)
    return lambda letter: letter.id in wanted


def _age(seconds: float | None) -> str:
    if seconds is None:
        return UNKNOWN
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _summary(letter: inspection.DeadLetter, now: float) -> dict[str, typing.Any]:
    return {
        "id": letter.id,
        "age": inspection.age(letter, now),
        "attempt": letter.attempt,
        "queue": letter.origin,
        "error": letter.error,
    }


def _decoded_body(letter: inspection.DeadLetter) -> typing.Any:
    if letter.content_type == "application/json":
        with contextlib.suppress(ValueError):
            return json.loads(letter.body)
    try:
        return letter.body.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(letter.body).decode()}


def _list(name: str, letters: list[inspection.DeadLetter], as_json: bool) -> None:
    now = time.time()
    if as_json:
        print(
            json.dumps(
                {
                    "consumer": name,
                    "count": len(letters),
                    "dead_letters": [_summary(letter, now) for letter in letters],
                }
            )
        )
        return
    lines = [("ID", "AGE", "ATTEMPT", "QUEUE", "ERROR")] + [
        (
            letter.id,
            _age(inspection.age(letter, now)),
            str(letter.attempt),
            letter.origin or UNKNOWN,
            letter.error.replace("\n", " ")[:120],
        )
        for letter in letters
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for line in lines:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[4]
        )
    print(f"{len(letters)} dead letter(s) of {name}")


def _show(letter: inspection.DeadLetter, as_json: bool) -> None:
    properties = {
        k: v
        for k, v in letter.properties.items()
        if k not in ("delivery_info", "delivery_tag", "body_encoding")
    }
    shown = {
        **_summary(letter, time.time()),
        "properties": properties,
        "headers": letter.headers,
        "body": _decoded_body(letter),
    }
    if as_json:
        print(json.dumps(shown, default=str))
        return
    for key in ("id", "queue", "attempt", "error"):
        print(f"{key}: {shown[key]}")
    print(f"age: {_age(shown['age'])}")
    print("properties: " + json.dumps(properties, default=str, sort_keys=True))
    print("headers: " + json.dumps(letter.headers, default=str, sort_keys=True))
    body = shown["body"]
    print(
        "body: " + (json.dumps(body, indent=2, default=str) if not isinstance(body, str) else body)
    )


def _target(spec: ConsumerSpec, letter: inspection.DeadLetter) -> str | None:
    """Where a replay sends ``letter``: the queue it failed on, if it is still one of the
    consumer's; a plain consumer's one queue if the letter does not say."""
    origin = letter.origin
    if origin is None:
        return spec.queue_names[0] if len(spec.queue_names) == 1 else None
    return origin if origin in spec.queue_names else None


def _lock() -> contextlib.AbstractContextManager[object]:
    """The web page's dead-letter lock, when the page started this command (see
    consumerd.consumer.sampling): its listing then never holds what this moves."""
    path = os.environ.get(sampling.LOCK_ENV)
    return sampling.dead_letter_lock(path, wait=True) if path else contextlib.nullcontext()


def dlq(args: argparse.Namespace) -> None:
    select = _selector(args)
    app, url = _app_and_url(args, select=False)
    spec = _consumer(app, args.name)
    queue = routing.dead_letter_queue(spec.name)
    with _lock(), _inspector(url) as inspector:
        if args.action == "replay" and not args.dry_run:
            inspector.prepare([spec.queue(name) for name in spec.queue_names])
        with inspector.dead_letters(queue) as session:
            chosen = [letter for letter in session.letters if select(letter)]
            if args.action == "list":
                _list(spec.name, chosen, args.json)
                return
            missing = sorted(set(args.ids) - {letter.id for letter in chosen})
            if args.action == "show":
                if missing:
                    raise cli.Failure(f"{queue} holds no message {args.ids[0]!r}")
                _show(chosen[0], args.json)
                return
            done, problems = _move(args, spec, session, chosen)
        left = (
            _left_behind(inspector, queue, len(chosen) - done)
            if args.all and not args.dry_run
            else 0
        )
        verb = {"replay": "replayed", "purge": "purged"}[args.action]
        if args.dry_run:
            verb = f"would be {verb}"
        print(f"{done} dead letter(s) of {spec.name} {verb}")
        problems += [f"{queue} holds no message {m!r}" for m in missing]
        failures = (
            [
                f"{len(problems)} not {verb}: "
                + "; ".join(problems[:5])
                + ("; ..." if len(problems) > 5 else "")
            ]
            if problems
            else []
        )
        if left:
            failures.append(
                f"{left} more still in {queue} (held by a listing such as the web page's "
                "while this ran, or dead-lettered since): run it again"
            )
        if failures:
            raise cli.Failure("; ".join(failures))


def _left_behind(inspector: inspection.Inspector, queue: str, kept: int) -> int:
    """Dead letters in ``queue`` beyond the ``kept`` that ``--all`` chose not to move,
    counted once this command's own hold is released. ``--all`` saw only those no one
    else held: on RabbitMQ, the ones the web page's listing (``basic.get``) held at that
    moment were invisible, and a shell cannot take the page's lock (it lives in the
    master's private metrics directory, not derived from the app or the broker)."""
    return max(0, inspector.depths([queue])[queue].ready - kept)


def _move(
    args: argparse.Namespace,
    spec: ConsumerSpec,
    session: inspection.DeadLetterSession,
    chosen: list[inspection.DeadLetter],
) -> tuple[int, list[str]]:
    done, problems = 0, []
    for letter in chosen:
        if args.action == "purge":
            if args.dry_run:
                print(f"purge {letter.id} ({letter.error[:80]})")
            elif not session.purge(letter):
                problems.append(f"{letter.id} was gone")
                continue
            done += 1
            continue
        target = _target(spec, letter)
        if target is None:
            problems.append(
                f"{letter.id}: its queue {letter.origin or '(not recorded)'} is "
                f"not one of {spec.name}'s"
            )
            continue
        if args.dry_run:
            print(f"replay {letter.id} -> {target} ({letter.error[:80]})")
        elif not session.replay(letter, target):
            problems.append(f"{letter.id} was gone")
            continue
        done += 1
    return done, problems
