"""Operations: Prometheus metrics, the health/metrics HTTP endpoint, JSON logs, layered config.

Each module has one job; the command line (``consumerd.cli``) wires them to the master.
"""
