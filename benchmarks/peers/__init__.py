"""Peer runners for benchmarks/throughput.py: one module per consumer framework.

Each runner module is configured through the environment (see :mod:`.config`), defines a
no-op handler that only calls :func:`.counter.hit`, and a ``fill(n)`` that pre-fills the
queue with ``n`` messages in that framework's own format (run via :mod:`.fill`).
"""
