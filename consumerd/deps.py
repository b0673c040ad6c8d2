"""The dependency ranges consumerd is tested with, and a fence around their private parts.

``transport/redis.py`` subclasses kombu's Redis transport and reaches into kombu and
redis-py internals; ``transport/amqp.py`` into py-amqp's socket reading;
``ops/metrics.py`` into prometheus_client's multiprocess files. A release that renames one
of them would otherwise surface as an ``AttributeError`` in the middle of consuming. Each
of those modules calls :func:`require` at import time with what it relies on, so a
version that lacks any of it fails at once with one line naming the version found and the
range tested (:data:`SUPPORTED`, the same ranges as ``pyproject.toml``, which a test keeps
in step).

An attribute counts as present when the class (or a base) has it, or when code of the
class stores or reads it on ``self`` (instance attributes set in ``__init__``): a
rename is caught, a changed meaning is not (that is what the pinned range is for).
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
import typing

#: Distribution → the range tested (both ends: ``tests/test_install.py``).
SUPPORTED = {
    "kombu": ">=5.6.2,<5.8",
    "amqp": ">=5.4.2,<6",
    "redis": ">=6.4,<9",
    "prometheus_client": ">=0.20,<0.27",
}


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(distribution)
        return str(getattr(module, "__version__", "unknown"))


def _names_in_code(cls: type) -> set[str]:
    """Attribute names the code of ``cls`` and its bases uses (``self.x``, ``obj.x``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            functions = (value.fget, value.fset) if isinstance(value, property) else (value,)
            for function in functions:
                function = getattr(function, "__func__", function)  # noqa: PLW2901
                code = getattr(function, "__code__", None)
                if isinstance(code, types.CodeType):
                    names.update(code.co_names)
    return names


def missing(relied_on: dict[typing.Any, str]) -> list[str]:
    """``owner.name`` for each of ``relied_on`` (owner → attribute names separated by
    white space) not found."""
    out = []
    for owner, names in relied_on.items():
        if isinstance(owner, type):
            used, where = _names_in_code(owner), f"{owner.__module__}.{owner.__qualname__}"
        else:  # a module
            used, where = set(), owner.__name__
        out += [f"{where}.{n}" for n in names.split() if not hasattr(owner, n) and n not in used]
    return out


def require(user: str, relied_on: dict[typing.Any, str], *distributions: str) -> None:
    """Raise one-line ``ImportError`` if any attribute of ``relied_on`` is missing."""
    absent = missing(relied_on)
    if absent:
        found = ", ".join(f"{d} {version_of(d)}" for d in distributions)
        wanted = ", ".join(f"{d}{SUPPORTED[d]}" for d in distributions)
        raise ImportError(
            f"{user} supports {wanted}; found {found}, which lacks {', '.join(absent)}"
        )
