"""oslo.config options for the ServiceManager, as ``cotyledon.oslo_config_glue`` has them.

Ceilometer, Aodh and Gnocchi call ``oslo_config_glue.setup(service_manager, conf)`` and
list the options in their ``*-config-generator.conf`` through the ``oslo.config.opts``
entry point (namespace ``consumerd`` here, ``cotyledon`` there). Same functions, same
option names, defaults and help texts as cotyledon 2.2, so a service's sample config and
deployed files do not change:

- ``[DEFAULT] graceful_shutdown_timeout`` (60; 0 waits for ever): the manager's, read at
  :func:`setup` and again at every SIGHUP. Workers started from then on get the new
  value; a running worker whose service has ``reload()`` takes it at its reload.
- ``[DEFAULT] log_options`` (True): every option's value is logged at DEBUG level by the
  master at :func:`setup` and by each worker once its service is built, and again after
  each reload.

On SIGHUP the master re-reads the configuration files (``reload_method="reload"``:
``conf.reload_config_files()``, every option may change; ``"mutate"``:
``conf.mutate_config_files()``, only ``mutable=True`` options change and oslo.config
logs the others as ignored) before its ``on_reload`` hooks run and before the workers get
SIGHUP. Each worker whose service defines ``reload()`` re-reads them itself just before
calling it. A service without ``reload()`` is restarted with the same worker_id and
inherits the master's freshly read configuration.

Where we differ from cotyledon 2.2, deliberately: an unknown ``reload_method`` is a
``ValueError`` (cotyledon silently reloads nothing), and the worker-side re-read is wired
to ``reload()`` (cotyledon 2.2 builds the wrapper but never installs it, so its workers
keep the configuration they were forked with).

oslo.config is an optional dependency (``pip install consumerd[oslo]``) imported only by
this module.
"""

from __future__ import annotations

import copy
import functools
import logging
import typing

from oslo_config import cfg

if typing.TYPE_CHECKING:
    from consumerd.supervisor.manager import ServiceId, ServiceManager
    from consumerd.supervisor.service import Service

LOG = logging.getLogger(__name__)

ReloadMethod = typing.Literal["reload", "mutate"]
RELOAD_METHODS: tuple[ReloadMethod, ...] = ("reload", "mutate")

service_opts = [
    cfg.BoolOpt(
        "log_options",
        default=True,
        mutable=True,
        help="Enables or disables logging values of all "
        "registered options when starting a service (at DEBUG "
        "level).",
    ),
    cfg.IntOpt(
        "graceful_shutdown_timeout",
        mutable=True,
        default=60,
        help="Specify a timeout after which a gracefully shutdown "
        "server will exit. Zero value means endless wait.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register ``log_options`` and ``graceful_shutdown_timeout`` in ``[DEFAULT]``."""
    conf.register_opts(service_opts)


def unregister_opts(conf: cfg.ConfigOpts) -> None:
    conf.unregister_opts(service_opts)


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """The ``oslo.config.opts`` entry point, for ``oslo-config-generator --namespace consumerd``."""
    return [(None, copy.deepcopy(service_opts))]


def setup(
    service_manager: ServiceManager,
    conf: cfg.ConfigOpts,
    reload_method: ReloadMethod = "reload",
) -> None:
    """Register the options in ``conf``, then :func:`link` them to ``service_manager``."""
    register_opts(conf)
    link(service_manager, conf, reload_method)


def link(
    service_manager: ServiceManager,
    conf: cfg.ConfigOpts,
    reload_method: ReloadMethod = "reload",
) -> None:
    """Apply the options to ``service_manager`` now and at every SIGHUP, and have workers
    re-read the configuration files before their service's ``reload()``.

    :func:`register_opts` must have been called (:func:`setup` does both).
    """
    if reload_method not in RELOAD_METHODS:
        raise ValueError(f"reload_method must be one of {RELOAD_METHODS}, not {reload_method!r}")
    _apply_to_manager(service_manager, conf)
    service_manager.register_hooks(
        on_reload=functools.partial(_reload_in_master, service_manager, conf, reload_method),
        # A partial of a module-level function: picklable for the spawn and forkserver
        # start methods (a ConfigOpts pickles; the worker gets a copy).
        on_new_worker=functools.partial(_new_worker, conf, reload_method),
    )


def _apply_to_manager(service_manager: ServiceManager, conf: cfg.ConfigOpts) -> None:
    service_manager._graceful_shutdown_timeout = conf.graceful_shutdown_timeout
    _log_options(conf)


def _log_options(conf: cfg.ConfigOpts) -> None:
    if conf.log_options:
        LOG.debug("Full set of CONF:")
        conf.log_opt_values(LOG, logging.DEBUG)


def _reread(conf: cfg.ConfigOpts, reload_method: ReloadMethod) -> None:
    """Re-read the files; oslo.config logs a file that does not parse and keeps the
    values it had."""
    if reload_method == "reload":
        conf.reload_config_files()
    else:
        conf.mutate_config_files()


def _reload_in_master(
    service_manager: ServiceManager, conf: cfg.ConfigOpts, reload_method: ReloadMethod
) -> None:
    _reread(conf, reload_method)
    _apply_to_manager(service_manager, conf)


def _new_worker(
    conf: cfg.ConfigOpts,
    reload_method: ReloadMethod,
    service_id: ServiceId,
    worker_id: int,
    service: Service,
) -> None:
    """``on_new_worker``: log the options, and wrap the service's own ``reload()``."""
    _log_options(conf)
    from consumerd.supervisor.service import Service  # noqa: PLC0415 - for the check only

    cls = type(service)
    if cls.reload is Service.reload:
        return  # no reload(): the worker is restarted and inherits the master's conf
    original = service.reload

    def reload() -> None:
        _reread(conf, reload_method)
        if cls.graceful_shutdown_timeout is None:  # the service does not set its own
            target.graceful_shutdown_timeout = conf.graceful_shutdown_timeout
        _log_options(conf)
        original()

    target: typing.Any = service  # an instance attribute shadows the method
    target.reload = reload
