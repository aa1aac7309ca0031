# chatgateway: the gateway (and, with another command, the reference core) as a container.
#
#   docker build -t chat-gateway:latest .
#   docker run -p 80:80 -p 50051:50051 -e CHAT_SERVICE_URI=chat-service:7010 \
#     -e CACHE_URI=redis://redis:6379/0 -e OAUTH2_ISSUER=https://auth.example.com chat-gateway:latest
#
# Two stages: the build stage installs the package and its runtime dependencies
# (install_requires only, no test or dev extras) into a virtualenv; the final stage
# is a fresh slim Python with that virtualenv and nothing else, run as a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY setup.py ./
COPY twisted ./twisted
COPY chatgateway ./chatgateway
# twistd finds plugins through a cache it writes on first use: write it now, while
# the directory is writable (the final image runs as non-root).
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin chat
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
# HTTP_PORT (WebSocket /ws, Connect, /healthz, /readyz, /metrics) and GRPC_PORT, at their defaults.
EXPOSE 80 50051
# Liveness of the process on whatever HTTP_PORT it was given (the image has no curl).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HTTP_PORT', '80'), timeout=2)"]
# SIGTERM drains (DRAIN_TIMEOUT_SEC) and exits 0.
STOPSIGNAL SIGTERM
CMD ["twistd", "--nodaemon", "--pidfile=", "chatgateway"]
