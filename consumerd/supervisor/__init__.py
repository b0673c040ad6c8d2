"""The supervision core: a master process that runs and watches worker processes.

This package knows nothing of message brokers; the consumer runtime builds on it.
"""

from consumerd.supervisor.manager import ServiceManager
from consumerd.supervisor.service import Service

__all__ = ["Service", "ServiceManager"]
