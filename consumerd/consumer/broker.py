# mypy: disallow-untyped-calls=False
# (kombu's annotations are partial)
"""Broker URL → :class:`kombu.Connection`: the one place that knows the schemes.

Resolution order for the URL: the ``broker`` setting (``--broker``, ``$CONSUMERD_BROKER``
or the config file, see :mod:`consumerd.config`), then the app's own ``broker=``, then
the embedded default (a SQLite file under ``./.consumerd/`` in the working directory).
The setting beats the code so one build can be pointed anywhere (12-factor); an App used
outside the ``consumerd`` command (a web app publishing) reads ``$CONSUMERD_BROKER`` too.

Query parameters become kombu ``transport_options`` (``redis://h/0?visibility_timeout=30``);
numeric values are converted.

SQLite URLs follow SQLAlchemy's convention: what follows ``sqlite:///`` is the path, so
``sqlite:///relative.db`` is ``relative.db`` in the working directory and
``sqlite:////var/lib/app/broker.db`` (four slashes) is absolute; a host
(``sqlite://name.db``) is an error. :func:`resolve_url` turns a relative path into the
absolute URL once, in the process that reads the configuration, so every worker and
publisher it starts opens the same file whatever their working directory. Validation,
:func:`connect` and the embedded transport all read the path with :func:`sqlite_path`.
(Before, ``sqlite:///relative.db`` silently meant ``/relative.db``; a relative URL whose
file is missing while the old, absolute reading of it exists is warned about.)

kombu is imported only by :func:`connect`: the master process validates URLs and loads
apps but never imports kombu, so nothing of it is inherited by forked workers.
"""

from __future__ import annotations

import logging
import os
import typing
import urllib.parse

from consumerd import config

if typing.TYPE_CHECKING:
    from kombu.connection import Connection

LOG = logging.getLogger("consumerd.consumer")

ENV_VAR = config.env_name("broker")
DEFAULT_PATH = os.path.join(".consumerd", "broker.db")
_REDIS_TRANSPORT = "consumerd.consumer.transport.redis:Transport"
_SQLITE_TRANSPORT = "consumerd.consumer.transport.sqlite:Transport"
_AMQP_TRANSPORT = "consumerd.consumer.transport.amqp:Transport"
_TRANSPORTS = {
    "amqp": "pyamqp",
    "amqps": "pyamqp",
    "pyamqp": "pyamqp",
    "redis": _REDIS_TRANSPORT,
    "rediss": _REDIS_TRANSPORT,
    "sqlite": _SQLITE_TRANSPORT,
    # kombu's filesystem transport: cross-process but keeps unacked state in memory,
    # so a crashed worker loses its prefetched messages. For experiments only.
    "filesystem": "filesystem",
}


HEARTBEAT = 30.0
"""AMQP heartbeat of a worker's consuming connection, in seconds (``?heartbeat=`` in the
URL; 0: none). Without one a connection that dies silently (a host gone, a NAT entry
dropped) is never noticed: the worker waits for messages for ever while the broker has
them requeued for others."""
CONSUMER_TIMEOUT = 1800.0
"""RabbitMQ's ``consumer_timeout`` (seconds; ``?consumer_timeout=`` in the URL says what
the broker is set to, 0: none): a delivery unacked that long closes its channel."""
_AMQP_ONLY = ("heartbeat", "consumer_timeout")


class BrokerURLError(ValueError):
    """A broker URL that cannot be used, with a message fit for the command line."""


def default_url() -> str:
    return sqlite_url(os.path.abspath(DEFAULT_PATH))


def resolve_url(explicit: str | None = None, app_default: str | None = None) -> str:
    """The URL to use, a relative SQLite path made absolute against the working directory."""
    url = explicit or os.environ.get(ENV_VAR) or app_default or default_url()
    if not url.lower().startswith("sqlite:"):
        return url
    try:
        written = _sqlite_written_path(url)
    except BrokerURLError:
        return url  # left for validate() to report
    path = os.path.abspath(written)
    if not os.path.isabs(written):
        _warn_if_moved(url, "/" + written, path)
    query = url.partition("?")[2]
    return sqlite_url(path) + (f"?{query}" if query else "")


def sqlite_url(path: str) -> str:
    """The URL of the database file at the absolute ``path``."""
    return "sqlite:///" + urllib.parse.quote(path)


def sqlite_path(url: str) -> str:
    """The absolute path of the database file of a ``sqlite:`` URL (see the module
    docstring), relative ones against the working directory; raises
    :class:`BrokerURLError`."""
    return os.path.abspath(_sqlite_written_path(url))


def _sqlite_written_path(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    rest = rest.partition("?")[0]
    if not sep or scheme.lower() != "sqlite" or not rest.startswith("/") or rest == "/":
        raise BrokerURLError(
            f"sqlite broker URL must name a file, like sqlite:///relative/path.db or "
            f"sqlite:////absolute/path.db, not {redact(url)!r}"
        )
    path = urllib.parse.unquote(rest[1:])
    if path.startswith("/"):
        path = "/" + path.lstrip("/")  # sqlite://///x means /x, not the POSIX-special //x
    return path


_warned: set[str] = set()


def _warn_if_moved(url: str, old: str, path: str) -> None:
    """Before SQLAlchemy's convention this URL meant ``old``: if that file exists and the
    new one does not, its messages would be left behind without a word."""
    if url in _warned or os.path.exists(path) or not os.path.exists(old):
        return
    _warned.add(url)
    LOG.warning(
        "broker %s is %s, relative to the working directory (as in SQLAlchemy); "
        "the existing %s is not used: write %s for it",
        redact(url),
        path,
        old,
        sqlite_url(os.path.normpath(old)),
    )


def is_default(url: str) -> bool:
    return url == default_url()


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _option(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise BrokerURLError(f"malformed broker URL {redact(url)!r}: expected scheme://...")
    return scheme.lower()


def validate(url: str) -> str:
    """Check ``url`` and return its scheme; raises :class:`BrokerURLError`."""
    scheme = _scheme_of(url)
    if scheme not in _TRANSPORTS:
        known = ", ".join(sorted(_TRANSPORTS))
        raise BrokerURLError(
            f"unknown broker scheme {scheme!r} in {redact(url)!r} (known: {known})"
        )
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a non-numeric or out-of-range port
    except ValueError as exc:
        raise BrokerURLError(f"malformed broker URL {redact(url)!r}: {exc}") from None
    if scheme == "sqlite":
        sqlite_path(url)
    return scheme


def consuming_options(url: str) -> tuple[float, float]:
    """``(heartbeat, consumer_timeout)`` for a worker consuming from ``url``: the URL's
    values or the defaults on AMQP, ``(0, 0)`` elsewhere (no such thing there)."""
    if _TRANSPORTS.get(_scheme_of(url)) != "pyamqp":
        return 0.0, 0.0
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    return (
        float(query.get("heartbeat", HEARTBEAT)),
        float(query.get("consumer_timeout", CONSUMER_TIMEOUT)),
    )


def url_options(url: str) -> dict[str, object]:
    """The transport options a URL's query string sets (``?reserve_mb=0``, ...)."""
    query = urllib.parse.urlsplit(url).query
    return {k: _option(v) for k, v in urllib.parse.parse_qsl(query)}


def connect(url: str, *, confirm_each: bool = True, **kwargs: object) -> Connection:
    """A (not yet connected) :class:`kombu.Connection` for ``url``; a consuming worker
    passes ``heartbeat=`` (see :func:`consuming_options`), a publisher has none.

    On RabbitMQ each publish waits for the broker's confirm, unless ``confirm_each`` is
    False: then the caller puts its channels in confirm mode and reads the confirms
    itself, a window at a time (:mod:`consumerd.consumer.publishing`)."""
    from kombu.connection import Connection  # noqa: PLC0415 - the master never imports kombu

    scheme = validate(url)
    options = url_options(url)
    if scheme in ("redis", "rediss"):
        # Without a socket timeout a read on a half-open connection (broker host gone
        # without a reset) blocks for ever, even kombu's close of a dead channel.
        # Blocking reads (BRPOP) return within kombu's brpop_timeout (1 s) anyway.
        options.setdefault("socket_timeout", 10)
        options.setdefault("socket_connect_timeout", 5)
        # The lock of kombu's restore sweep outlives a worker SIGKILLed while sweeping:
        # with kombu's 300 s default nothing was restored for 5 minutes (chaos soak).
        # A lock that expires early can only make two sweeps overlap: duplicates, no loss.
        options.setdefault("unacked_mutex_expire", 15)
    transport = _TRANSPORTS[scheme]
    if transport == "pyamqp":
        transport = _AMQP_TRANSPORT  # py-amqp's, reading the socket in chunks
        for name in _AMQP_ONLY:  # read by consuming_options(), not transport options
            options.pop(name, None)
        # Publisher confirms: a retry copy or dead letter is on the broker before the
        # original is acked.
        options.setdefault("confirm_publish", True)
        if not confirm_each:
            options["confirm_publish"] = False
    # Not urlunsplit(): it turns sqlite:///abs/path into sqlite:/abs/path.
    bare = sqlite_url(sqlite_path(url)) if scheme == "sqlite" else url.split("?", 1)[0]
    return Connection(bare, transport=transport, transport_options=options, **kwargs)


def is_amqp(connection: Connection) -> bool:
    """True for RabbitMQ, where the broker itself pushes, requeues and enforces
    single-active-consumer; False for kombu's virtual (polling) transports."""
    return bool(connection.transport.driver_type == "amqp")
