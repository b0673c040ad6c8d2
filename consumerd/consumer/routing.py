"""Queue names, partition hashing and the partition → worker map.

Everything here is pure and deterministic so producers, workers and ``consumerd check``
agree without talking to each other.
"""

from __future__ import annotations

import zlib

PARTITION_SEPARATOR = ".p"
RETRY_SUFFIX = ".retry"
DEAD_LETTER_SUFFIX = ".dlq"


def partition_queue(name: str, partition: int) -> str:
    return f"{name}{PARTITION_SEPARATOR}{partition}"


def retry_queue(name: str) -> str:
    return f"{name}{RETRY_SUFFIX}"


def dead_letter_queue(name: str) -> str:
    return f"{name}{DEAD_LETTER_SUFFIX}"


def key_bytes(key: str | bytes | int) -> bytes:
    if isinstance(key, bytes):
        return key
    return str(key).encode("utf-8")


def key_text(key: str | bytes | int) -> str:
    """A key as a header value (any broker carries text): bytes as hex."""
    return key.hex() if isinstance(key, bytes) else str(key)


def partition_of(key: str | bytes | int, partitions: int) -> int:
    """The partition of ``key``: CRC-32 of its UTF-8 bytes modulo ``partitions``.

    CRC-32 rather than :func:`hash`: Python's string hash is salted per process, and the
    producer and every worker (in any language) must agree on it forever.
    """
    return zlib.crc32(key_bytes(key)) % partitions


def global_worker(worker_id: int, workers: int, member: int) -> int:
    """The index of a worker among all workers of all members (``I*W + w`` over ``M*W``)."""
    return member * workers + worker_id


def owner_of(partition: int, total_workers: int) -> int:
    """The global worker that consumes ``partition``: ``p mod (M*W)``."""
    return partition % total_workers


def owned_partitions(partitions: int, global_id: int, total_workers: int) -> list[int]:
    """The partitions of one consumer that a worker consumes when all workers are up."""
    return list(range(global_id, partitions, total_workers))
