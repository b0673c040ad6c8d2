"""Find the :class:`App` named by ``--app module[:attribute]`` (attribute defaults to ``app``)."""

from __future__ import annotations

import importlib
import sys

from consumerd.consumer.app import App


class AppLoadError(Exception):
    """Why an ``--app`` reference cannot be used, as one line for the command line."""


def split_ref(ref: str) -> tuple[str, str]:
    module, _, attribute = ref.partition(":")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise AppLoadError(f"--app {ref!r}: expected module[:attribute], e.g. myapp.consumers:app")
    attribute = attribute or "app"
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise AppLoadError(f"--app {ref!r}: {attribute!r} is not an attribute name")
    return module, attribute


def load_app(ref: str, *, reload: bool = False, require_consumers: bool = True) -> App:
    """Import the module and return its App.

    ``reload=True`` re-executes the module (SIGHUP): a fresh App with fresh declarations.
    Only that module is re-executed; modules it imports keep their code (SIGUSR2 replaces
    the workers with freshly imported code).
    """
    module_name, attribute = split_ref(ref)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: apps in the working directory import
    try:
        module = sys.modules.get(module_name)
        if reload and module is not None:
            module = importlib.reload(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(f"--app {ref!r}: no module named {exc.name!r}") from None
        raise AppLoadError(f"--app {ref!r}: importing it failed: {_one_line(exc)}") from None
    except Exception as exc:
        raise AppLoadError(f"--app {ref!r}: importing it failed: {_one_line(exc)}") from None
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise AppLoadError(f"--app {ref!r}: module {module_name!r} has no attribute {part!r}")
        found = getattr(found, part)
    if not isinstance(found, App):
        raise AppLoadError(
            f"--app {ref!r}: {attribute!r} is a {type(found).__name__}, not a consumerd.App"
        )
    if require_consumers and not found.consumers:
        raise AppLoadError(f"--app {ref!r}: app {found.name!r} declares no consumers")
    return found


def check_queues(app: App, queues: tuple[str, ...] | None) -> None:
    """Raise :class:`AppLoadError` if ``--queues`` names a consumer ``app`` does not declare
    (such a worker would consume nothing, for ever)."""
    missing = [name for name in queues or () if name not in app.consumers]
    if missing:
        raise AppLoadError(
            f"--queues: app {app.name!r} declares no consumer named {', '.join(missing)} "
            f"(it declares {', '.join(app.consumers)})"
        )


def select(app: App, queues: tuple[str, ...] | None) -> App:
    """``app`` with only the consumers ``--queues`` names (all when None)."""
    check_queues(app, queues)
    if queues is not None:
        app.consumers = {n: s for n, s in app.consumers.items() if n in queues}
    return app


def _one_line(exc: BaseException) -> str:
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")
