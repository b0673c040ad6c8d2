"""consumerd: long-lived queue consumers under a real process supervisor.

The supervision core (:class:`Service`, :class:`ServiceManager`) is a drop-in for
cotyledon 2.2: ``import consumerd as cotyledon`` runs code written for it unchanged.
The consumer runtime (:class:`App`) builds on it and is imported lazily, so code that
only supervises processes never pays for importing kombu.
"""

from __future__ import annotations

import typing

from consumerd.supervisor import Service, ServiceManager

if typing.TYPE_CHECKING:
    from consumerd.consumer.app import App, Message
    from consumerd.consumer.notifications import NotificationResult
    from consumerd.consumer.publishing import PublishError

__all__ = [
    "App",
    "Message",
    "NotificationResult",
    "PublishError",
    "Service",
    "ServiceManager",
    "__version__",
]


def __getattr__(name: str) -> typing.Any:
    if name in ("App", "Message"):
        from consumerd.consumer import app  # noqa: PLC0415 - keeps kombu out of the core

        return getattr(app, name)
    if name == "PublishError":
        from consumerd.consumer.publishing import PublishError  # noqa: PLC0415

        return PublishError
    if name == "NotificationResult":
        from consumerd.consumer.notifications import NotificationResult  # noqa: PLC0415

        return NotificationResult
    if name == "__version__":  # from the installed metadata: one source, pyproject.toml
        from importlib.metadata import version  # noqa: PLC0415 - only when asked

        return version("consumerd")
    raise AttributeError(f"module 'consumerd' has no attribute {name!r}")
