"""Operations: Prometheus metrics, the health/metrics HTTP endpoint, JSON logs, layered config.

Each module has one job and is wired into the command line by ``consumerd.cli``.
"""
