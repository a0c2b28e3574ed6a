# syntax=docker/dockerfile:1
# One image for the four services; the argument picks what runs (`python -m <argument>`):
#   docker run tally:0.1.0                                -> services.ledger (the default)
#   docker run tally:0.1.0 services.metering              -> metering (also pricing, notifier)
#   docker run tally:0.1.0 tally.cli.main migrate         -> `tally migrate`
# k8s/ runs it with TALLY_DATABASE_URL / TALLY_REDIS_URL set: the embedded PostgreSQL and Valkey
# (the `embedded` extra) are not in the image.

# The base image is pinned by digest, so a rebuild gets the same bytes whatever the tag points at
# today (tests/deploy/test_lock.py checks every FROM). The digest is the multi-arch index of
# python:3.11-slim (Debian trixie). This box has no registry access, so it was not resolved here:
# it was taken from public repositories that pin the same tag (Renovate-style `tag@sha256:` pins
# in several Dockerfiles, a `docker build` log resolving docker.io/library/python:3.11-slim to it,
# and a note recording it as the tag's index digest, resolved 2026-08-21). To move it on purpose:
# `docker buildx imagetools inspect python:3.11-slim` and paste the index digest below.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The locked runtime dependencies alone first (requirements/runtime.lock: exact versions and
# hashes, no dev tools, no embedded servers), so this layer is reused while only the source
# changes.
COPY requirements/runtime.lock ./
RUN pip install --require-hashes --only-binary :all: -r runtime.lock
# Then the package itself: tally (libs/tally) and services, with the migrations, the default
# catalog and the limiter's Lua script as package data; pip byte-compiles it, which matters
# because the container's root filesystem is read-only at run time.
COPY libs ./libs
COPY services ./services
RUN pip install --no-deps --no-build-isolation . \
 && cd /tmp && python -c "import services.ledger.server, tally.cli.main, tally.kit.db as db; assert all((db.migrations_dir(s) / 'versions').is_dir() for s in db.SERVICES)"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TALLY_HOST=0.0.0.0 \
    TALLY_DATA_DIR=/tmp/tally
RUN groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tally
# The installed package is the whole program (the source tree is not needed beside it: the
# wheel carries services/*/migrations, the catalog and the Lua script).
COPY --from=builder /opt/venv /opt/venv
# An empty working directory, so nothing in it shadows the installed packages.
WORKDIR /app
USER 10001:10001
EXPOSE 50051 50052 50053 50054 9464
ENTRYPOINT ["python", "-m"]
CMD ["services.ledger"]
