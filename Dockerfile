# consumerd in a container: `docker build -t consumerd .` then
#   docker run --rm consumerd                       # examples.minimal, 2 workers
# Your app goes into an image built FROM this one: see deploy/Dockerfile.app.
# The master runs as PID 1 (exec-form entrypoint, no shell in between): it gets
# `docker stop`'s SIGTERM itself, drains its workers and reaps any orphaned process.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY consumerd ./consumerd
COPY examples ./examples
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/consumerd --create-home consumerd

# The embedded broker's database lives in the working directory (./.consumerd/): give
# the non-root user a writable one, and a volume so messages survive the container.
WORKDIR /var/lib/consumerd
VOLUME ["/var/lib/consumerd"]
# With --metrics-port, the probes and the scraper come from outside the container.
ENV PYTHONPATH=/app \
    CONSUMERD_METRICS_ADDRESS=0.0.0.0
USER consumerd

# docker stop waits 10 s before SIGKILL; the graceful timeout must end before that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["consumerd", "health", "--pidfile", "/tmp/consumerd.pid"]
ENTRYPOINT ["consumerd", "--pidfile", "/tmp/consumerd.pid", "--graceful-timeout", "8"]
# The app comes from the environment, so that `docker run IMAGE --workers 4` (which
# replaces the CMD) keeps it; an app image sets its own CONSUMERD_APP.
ENV CONSUMERD_APP=examples.minimal
CMD ["--workers", "2"]
