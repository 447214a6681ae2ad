# The service's one image: the API (`mms serve`, the default command) and the build workers
# (`mms worker`). Builds with the classic builder and with BuildKit:
#
#     docker build -t mms .
#     docker build --build-arg BASE_IMAGE=registry.example/debian-python:3.11 -t mms .
#
# BASE_IMAGE: any Debian-like image with python3 (3.11 or newer) and its venv module; used for
# both stages, so the virtual environment's interpreter is the runtime's own.
# Extra CAs for the build (a TLS-inspecting proxy's): put PEM files (*.crt or *.pem) in
# docker/build-ca/. They are trusted by pip in the build stage only, never by the image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The dependencies, from pyproject.toml alone: cached until it changes.
FROM ${BASE_IMAGE} AS deps
ENV PIP_CONFIG_FILE=/tmp/pip.conf \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY docker/build-ca/ /tmp/build-ca/
# /opt/build-tools holds pip and setuptools to build with; /opt/mms keeps only pip, which the
# oci builder runs (`python -m pip wheel`) to turn sdist-only requirements such as pyspark
# into wheels.
RUN set -eu; \
    printf '[global]\n' > "$PIP_CONFIG_FILE"; \
    extra=$(find /tmp/build-ca -maxdepth 1 -type f \( -name '*.crt' -o -name '*.pem' \) | sort); \
    if [ -n "$extra" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt $extra > /tmp/pip-ca.pem; \
        printf 'cert = /tmp/pip-ca.pem\n' >> "$PIP_CONFIG_FILE"; \
    fi; \
    python3 -m venv /opt/build-tools; \
    /opt/build-tools/bin/pip install "setuptools>=70.1"; \
    python3 -m venv /opt/mms
COPY pyproject.toml /src/
# The client's dependencies and the server extra's: what `pip install .[server]` would install.
RUN set -eu; \
    /opt/build-tools/bin/python -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["server"]))' \
        > /tmp/requirements.txt; \
    /opt/build-tools/bin/pip --python /opt/mms/bin/python install --requirement /tmp/requirements.txt

# The project itself, staged under /opt/project so that it becomes a layer of its own: a source
# change rebuilds (and ships) a few megabytes, not the whole environment. No network here.
FROM deps AS build
COPY README.md /src/
COPY migrations /src/migrations
COPY scoring_server /src/scoring_server
COPY workers /src/workers
COPY app /src/app
COPY mms_client /src/mms_client
RUN set -eu; \
    /opt/build-tools/bin/pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /tmp/wheels /src; \
    /opt/build-tools/bin/pip --python /opt/mms/bin/python install --no-deps --no-index \
        --root /opt/project /tmp/wheels/*.whl

FROM ${BASE_IMAGE}
# tini as PID 1 forwards SIGTERM to the service and reaps the builders' child processes;
# bubblewrap contains the build steps that run a package's own code (SECURITY.md).
RUN set -eu; \
    if ! command -v tini > /dev/null || ! command -v bwrap > /dev/null; then \
        apt-get update; \
        apt-get install --yes --no-install-recommends tini bubblewrap; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 mms; \
    useradd --system --uid 10001 --gid mms --home-dir /var/lib/mms --no-create-home \
        --shell /usr/sbin/nologin mms; \
    install -d -o mms -g mms -m 0750 /var/lib/mms
COPY --from=deps /opt/mms /opt/mms
COPY --from=build /opt/project/ /
# Production: the service refuses to start without MMS_SECRET_KEY (32+ random characters),
# wants https asset URLs and reaches no private address it is not told to (README).
ENV PATH=/opt/mms/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MMS_ENV=production \
    MMS_HOST=0.0.0.0 \
    MMS_PORT=8000 \
    MMS_DATA_DIR=/var/lib/mms
# Numeric, so that a runtime can check it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
WORKDIR /var/lib/mms
EXPOSE 8000
# Liveness of the API; a worker container overrides it (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MMS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["mms", "serve"]
