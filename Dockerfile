# mserve: serve a mounted servable directory (MindSpore Serving layout) over HTTP.
#
#   docker build -t mserve .                              # CPU (the default)
#   docker build -t mserve:cuda --build-arg DEVICE=cuda . # NVIDIA GPUs: jax[cuda12], whose CUDA
#                                                          # libraries come as pip wheels; run it
#                                                          # with --gpus all (NVIDIA container toolkit)
#   docker run --rm -p 127.0.0.1:5500:5500 -v "$PWD/servables:/models:ro" mserve
#
# (-p 5500:5500 publishes on every interface of the host.) Mount a servable directory
# at /models: without one the container exits at once with code 2 and
# "no servables in /models".
#
# The arguments after the image name replace CMD (`mserve start` options; the directory
# first). /ready on the plain-HTTP health port (127.0.0.1:5501 inside the container) is
# the health check, so it works with HTTPS and mutual TLS on 5500 too.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG DEVICE=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MSERVE_CACHE_DIR=/cache

WORKDIR /opt/mserve
# Only what `pip install .` needs (pyproject's package-dir folders); see .dockerignore.
COPY pyproject.toml README.md ./
COPY app ./app
COPY backends ./backends
COPY cli ./cli
COPY servables ./servables
# The project itself: its dependencies are pinned where they must be, in pyproject.toml.
# hadolint ignore=DL3013
RUN case "$DEVICE" in \
      cpu)  pip install . ;; \
      cuda) pip install ".[cuda]" ;; \
      *)    echo "DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;; \
    esac

# Not root; the compile cache (MSERVE_CACHE_DIR) survives restarts when /cache is a volume.
RUN useradd --create-home --uid 10001 mserve && mkdir -p /models /cache && chown mserve /cache
USER 10001
WORKDIR /home/mserve
VOLUME ["/cache"]
EXPOSE 5500

HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5501/ready', timeout=2)"]

ENTRYPOINT ["mserve", "start"]
CMD ["/models", "--host", "0.0.0.0", "--port", "5500", "--health-port", "5501"]
