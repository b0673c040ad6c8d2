"""Find the :class:`App` named by ``--app module[:attribute]`` (attribute defaults to ``app``)."""

from __future__ import annotations

import importlib
import os
import subprocess
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
    except SystemExit as exc:
        # sys.exit() in the module would otherwise end the master quietly (status 0)
        # or a worker's reload; it is a broken app like any other.
        raise AppLoadError(f"--app {ref!r}: importing it called sys.exit({exc.code!r})") from None
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


#: How long a child may take to import the app before the check counts as failed.
CHECK_TIMEOUT = 60.0
_CHECK_SOURCE = (
    "import sys\n"
    "from consumerd.consumer import loading\n"
    "try:\n"
    "    loading.load_app(sys.argv[1])\n"
    "except loading.AppLoadError as exc:\n"
    "    print(exc, file=sys.stderr)\n"
    "    sys.exit(2)\n"
    "print('loaded')\n"  # os._exit(0) at import exits 0 too, but says nothing
)


def check_in_child(ref: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Import the app in a fresh interpreter, with this process's ``sys.path`` and working
    directory; :class:`AppLoadError` if that fails or the child dies (``os._exit()`` or a
    crash at import, which no ``except`` in this process could catch)."""
    paths = [p or os.getcwd() for p in sys.path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHECK_SOURCE, ref],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AppLoadError(f"--app {ref!r}: importing it took over {timeout:g}s") from None
    except OSError as exc:
        raise AppLoadError(f"--app {ref!r}: cannot check it in a child: {exc}") from None
    if done.returncode == 0 and done.stdout.splitlines()[-1:] == [b"loaded"]:
        return
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    if done.returncode == 2 and lines and lines[-1].startswith("--app "):
        raise AppLoadError(lines[-1])
    status = (
        f"killed by signal {-done.returncode}"
        if done.returncode < 0
        else f"exited with status {done.returncode}"
    )
    if done.returncode == 0:
        status = "ended the process (os._exit(0))"
    raise AppLoadError(
        f"--app {ref!r}: importing it {status} (checked in a child process)"
        + (f": {lines[-1]}" if lines else "")
    )


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
