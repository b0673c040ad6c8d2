"""The one configuration of consumerd: every command and every worker reads it from here.

Four layers, one precedence order: command line > environment > file > defaults.

- command line: ``--workers 4`` (:func:`add_arguments` defines the options, with no
  argparse default, so that an option not given does not hide the layers below);
- environment: ``CONSUMERD_WORKERS=4`` (``CONSUMERD_`` + the setting's name in capitals,
  one name per setting; an unknown ``CONSUMERD_*`` variable is an error, as an unknown key
  in the file is, so a misspelt or retired name never goes unnoticed);
- file: ``--config consumerd.toml`` (or ``$CONSUMERD_CONFIG``), settings as top-level keys,
  ``workers = 4`` (``-`` and ``_`` are the same in keys);
- defaults: :class:`Settings`.

:class:`Config` holds the settings in force and re-reads the layers on SIGHUP
(:meth:`Config.reload`): what can change live (:data:`LIVE`) takes effect, the rest waits
for a restart and is reported; a file that does not parse, a bad value or a failed check
raises :class:`ConfigError` and the running settings stay. The master hands the same
:class:`Config` to its workers, which read ``config.settings`` where each value is used.

This module is a leaf: it imports nothing else of consumerd, so every layer may use it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import os
import sys
import typing
from collections.abc import Callable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # A dependency on 3.10 only; it may be missing where mypy runs.
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

ENV_PREFIX = "CONSUMERD_"
CONFIG_ENV = "CONSUMERD_CONFIG"
#: Variables consumerd sets for its own processes (the master's re-exec state, the
#: metrics owner's pid): not settings, and not to be reported as unknown ones.
INTERNAL_ENV = frozenset(
    {
        "CONSUMERD_REEXEC_STATE",
        "CONSUMERD_METRICS_OWNER",
        "CONSUMERD_PREFLIGHT",
        "CONSUMERD_DLQ_LOCK",
    }
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting that cannot be used, with where it came from."""


# -- value parsers: each takes a string (command line, environment) or a TOML value ----


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(value: object) -> int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {bounds}, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"expected an integer {bounds}, got {value}")
        return value

    return parse


def _seconds(value: object) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value.strip())
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"expected a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _choice(choices: tuple[str, ...], fold: Callable[[str], str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and fold(value.strip()) in choices:
            return fold(value.strip())
        raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")

    return parse


def parse_member(value: object) -> tuple[int, int]:
    """``"I/M"`` (or ``[I, M]``) → ``(I, M)`` with ``0 <= I < M``; ValueError otherwise."""
    if isinstance(value, list) and len(value) == 2:
        value = f"{value[0]}/{value[1]}"
    if not isinstance(value, str):
        raise ValueError(f"expected I/M (e.g. 0/2), got {value!r}")
    index, sep, count = value.strip().partition("/")
    try:
        i, m = int(index), int(count)
    except ValueError:
        raise ValueError(f"expected I/M (e.g. 0/2), got {value!r}") from None
    if not sep or m < 1 or not 0 <= i < m:
        raise ValueError(f"expected I/M with M >= 1 and 0 <= I < M, got {value!r}")
    return i, m


def _names(value: object) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected names (a list, or separated by commas), got {value!r}")
    names = tuple(i.strip() for i in items if i.strip())
    if not names:
        raise ValueError("expected at least one name")
    return names


# -- the settings ------------------------------------------------------------------------


def _setting(
    default: typing.Any,
    parse: Callable[[object], typing.Any],
    help: str,
    *,
    live: bool = False,
    metavar: str | None = None,
    secret: bool = False,
) -> typing.Any:
    """A setting; a ``secret`` one is left out of the settings' repr and never logged."""
    return dataclasses.field(
        default=default,
        repr=not secret,
        metadata={
            "parse": parse,
            "help": help,
            "live": live,
            "metavar": metavar,
            "secret": secret,
        },
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting with its default; ``live`` ones change on SIGHUP without a restart."""

    app: str | None = _setting(
        None,
        _text,
        "the module holding the App, MODULE[:ATTR] (attribute 'app' by default)",
        metavar="MODULE[:ATTR]",
    )
    broker: str | None = _setting(
        None,
        _text,
        "broker URL (default: the app's broker=, else the embedded broker in ./.consumerd/)",
        metavar="URL",
    )
    workers: int = _setting(1, _int(1), "worker processes", live=True, metavar="N")
    workers_max: int | None = _setting(
        None,
        _int(1),
        "refuse a workers count above this (default: 64 per CPU)",
        live=True,
        metavar="N",
    )
    prefetch: int | None = _setting(
        None,
        _int(1),
        "prefetch of consumers that do not set their own",
        live=True,
        metavar="N",
    )
    concurrency: int | None = _setting(
        None,
        _int(1, 1024),
        "handlers running at once in a worker, for consumers that do not set their own",
        live=True,
        metavar="N",
    )
    queues: tuple[str, ...] | None = _setting(
        None,
        _names,
        "run only these consumers (default: all the app declares)",
        live=True,
        metavar="NAME,...",
    )
    graceful_timeout: float = _setting(
        60.0, _seconds, "seconds a stopping worker may take to finish", metavar="S"
    )
    broker_down_limit: float = _setting(
        60.0,
        _seconds,
        "a worker without broker for this long exits with status 75",
        live=True,
        metavar="S",
    )
    log_level: str = _setting(
        "INFO", _choice(LOG_LEVELS, str.upper), "log level", live=True, metavar="LEVEL"
    )
    log_format: str = _setting(
        "text",
        _choice(LOG_FORMATS, str.lower),
        "text (readable) or json (one object a line)",
        live=True,
        metavar="FORMAT",
    )
    metrics_port: int | None = _setting(
        None,
        _int(0, 65535),
        "serve /metrics, /healthz and /readyz on this port (off if unset)",
        metavar="PORT",
    )
    metrics_address: str = _setting(
        "127.0.0.1",
        _text,
        "address the metrics port binds (0.0.0.0 in a container)",
        metavar="ADDRESS",
    )
    admin_token: str | None = _setting(
        None,
        _text,
        "a secret that lets the web page at / on the metrics port replay and purge dead "
        "letters (Authorization: Bearer TOKEN); unset, the page is read-only",
        live=True,
        metavar="TOKEN",
        secret=True,
    )
    web_hosts: tuple[str, ...] = _setting(
        (),
        _names,
        "host names the web page at / answers to besides IP addresses and localhost "
        "(a proxy's or an ingress's name)",
        live=True,
        metavar="NAME,...",
    )
    pidfile: str | None = _setting(None, _text, "the master's pid file", metavar="PATH")
    member: tuple[int, int] = _setting(
        (0, 1),
        parse_member,
        "this host is member I of M sharing the partitions",
        metavar="I/M",
    )
    max_messages_per_worker: int | None = _setting(
        None,
        _int(1),
        "recycle a worker after about this many messages",
        live=True,
        metavar="N",
    )
    max_memory_per_worker: int | None = _setting(
        None,
        _int(1),
        "recycle a worker above about this resident memory, in MB",
        live=True,
        metavar="MB",
    )


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
#: Settings a reload applies at once; any other change needs a restart.
LIVE = frozenset(name for name, f in FIELDS.items() if f.metadata["live"])


def env_name(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()


def _parse(name: str, value: object, source: str) -> typing.Any:
    try:
        return FIELDS[name].metadata["parse"](value)
    except ValueError as exc:
        if FIELDS[name].metadata["secret"]:  # the message would quote the value
            raise ConfigError(f"{source}: expected a non-empty string") from None
        raise ConfigError(f"{source}: {exc}") from None


def _unknown(name: str, known: typing.Iterable[str], shown: Callable[[str], str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {shown(close[0])}?)" if close else ""


# -- the layers --------------------------------------------------------------------------


def read_file(path: str) -> dict[str, typing.Any]:
    """The settings in a TOML file; :class:`ConfigError` for anything wrong in it."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    found = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            hint = _unknown(name, FIELDS, lambda n: repr(n.replace("_", "-")))
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
        found[name] = _parse(name, value, f"config file {path}: {key}")
    return found


def read_environment(environ: Mapping[str, str]) -> dict[str, typing.Any]:
    """The settings in ``CONSUMERD_*`` variables; an unknown one is a :class:`ConfigError`."""
    names = {env_name(name): name for name in FIELDS}
    found = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or var in INTERNAL_ENV:
            continue
        if var not in names:
            setting = var.removeprefix(ENV_PREFIX).lower()
            hint = _unknown(setting, FIELDS, lambda n: "$" + env_name(n))
            raise ConfigError(f"${var}: unknown setting{hint}")
        if value.strip():
            found[names[var]] = _parse(names[var], value, f"${var}")
    return found


def _help(name: str, reloads: bool) -> str:
    field = FIELDS[name]
    default = field.default
    shown = "/".join(map(str, default)) if isinstance(default, tuple) else default
    where = f"${env_name(name)}" + ("" if default is None else f"; default {shown}")
    live = "; SIGHUP applies a change" if reloads and field.metadata["live"] else ""
    return f"{field.metadata['help']} ({where}{live})"


def argument_type(name: str) -> Callable[[str], typing.Any]:
    """An argparse ``type=`` parsing setting ``name`` as every layer does."""
    parse = FIELDS[name].metadata["parse"]

    def convert(text: str) -> typing.Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_arguments(
    parser: argparse.ArgumentParser,
    names: typing.Iterable[str] | None = None,
    *,
    reloads: bool = False,
) -> None:
    """Add ``--config`` and an option for each setting in ``names`` (default: all), none
    with a default of its own; ``reloads``: the command re-reads its settings on SIGHUP."""
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"a TOML file of settings (${CONFIG_ENV})",
    )
    for name in FIELDS if names is None else names:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=argument_type(name),
            default=argparse.SUPPRESS,
            metavar=FIELDS[name].metadata["metavar"],
            help=_help(name, reloads),
        )


def load(
    cli: Mapping[str, typing.Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from the layers. ``cli`` holds the options given on the command line only
    (``vars(args)`` of a parser built with :func:`add_arguments`; other keys are ignored)
    and may hold ``config``, the file's path."""
    environ = os.environ if environ is None else environ
    path = cli.get("config") or environ.get(CONFIG_ENV) or None
    layers = [
        read_file(path) if path else {},
        read_environment(environ),
        {k: v for k, v in cli.items() if k in FIELDS},
    ]
    merged: dict[str, typing.Any] = {}
    for layer in layers:  # lowest first: later ones win
        merged.update(layer)
    settings = Settings(**merged)
    _check_workers(settings)
    return settings


#: Workers per CPU above which a count is taken for a mistake (``--workers 100000``
#: would fork until the host runs out of memory); ``workers-max`` overrides it.
WORKERS_PER_CPU = 64


def workers_limit(settings: Settings) -> int:
    """The highest worker count ``settings`` allow."""
    if settings.workers_max is not None:
        return settings.workers_max
    return WORKERS_PER_CPU * (os.cpu_count() or 1)


def _check_workers(settings: Settings) -> None:
    limit = workers_limit(settings)
    if settings.workers > limit:
        why = (
            f"--workers-max {limit}"
            if settings.workers_max is not None
            else f"{WORKERS_PER_CPU} per CPU, {os.cpu_count() or 1} CPU(s)"
        )
        raise ConfigError(
            f"workers: {settings.workers} is above the limit of {limit} ({why}); "
            "set workers-max to allow more"
        )


# -- reloading ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reload:
    """What a reload found: changes applied now, and changes waiting for a restart."""

    applied: dict[str, tuple[typing.Any, typing.Any]]
    needs_restart: dict[str, tuple[typing.Any, typing.Any]]


class Config:
    """The settings in force, re-read from the same layers on :meth:`reload`.

    Picklable (it keeps the command-line options, not the environment), so it reaches
    workers started with any multiprocessing start method.
    """

    def __init__(
        self, cli: Mapping[str, typing.Any], environ: Mapping[str, str] | None = None
    ) -> None:
        self._cli = dict(cli)
        self._environ = None if environ is None else dict(environ)
        self.settings = load(self._cli, self._environ)

    def reload(self, check: Callable[[Settings], None] | None = None) -> Reload:
        """Re-read the layers (the file, mostly) and apply the live changes.

        ``check`` may reject the new settings by raising :class:`ConfigError`. On any
        error (log it) the settings in force are unchanged.
        """
        fresh = load(self._cli, self._environ)
        applied: dict[str, tuple[typing.Any, typing.Any]] = {}
        waiting: dict[str, tuple[typing.Any, typing.Any]] = {}
        for name in FIELDS:
            old, new = getattr(self.settings, name), getattr(fresh, name)
            if old != new:
                (applied if name in LIVE else waiting)[name] = (old, new)
        updated = dataclasses.replace(
            self.settings, **{name: new for name, (_, new) in applied.items()}
        )
        if check is not None:
            check(updated)
        self.settings = updated
        return Reload(applied, waiting)
