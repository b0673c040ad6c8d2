# Your app's image, on top of consumerd's. Copy this file into your project, next to the
# package holding your consumers (here myapp/, with myapp/consumers.py), and build there:
#
#   docker build -t consumerd /path/to/consumerd    # the base image (its Dockerfile), once
#   docker build -f Dockerfile.app -t myapp .       # your app on top of it
#   docker run -e CONSUMERD_BROKER=amqp://user:pass@rabbit:5672// myapp
#   docker run myapp --workers 4 --broker amqp://...   # arguments replace the CMD below
#
# The base image keeps consumerd's exec-form ENTRYPOINT (the master is PID 1 and drains
# within --graceful-timeout 8 on `docker stop`), its HEALTHCHECK, the non-root user and
# PYTHONPATH=/app: a package copied under /app imports as `--app myapp.consumers`.
FROM consumerd

# Your own dependencies, if any (pip needs root; the image then runs as consumerd again):
#   USER root
#   COPY requirements.txt /app/
#   RUN pip install -r /app/requirements.txt
#   USER consumerd

COPY myapp/ /app/myapp/
# The app comes from the environment, so `docker run myapp --workers 4` keeps it.
ENV CONSUMERD_APP=myapp.consumers
CMD ["--workers", "2"]
