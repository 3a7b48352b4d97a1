# syntax=docker/dockerfile:1
# The detector's container image: `docker build -t ec2-credential-detector .`
#
#   docker run --rm -p 9108:9108 -e DETECTOR_KAFKA_BOOTSTRAP=kafka:9092 ec2-credential-detector
#
# Two stages: the builder turns the source into a wheel and installs it, with its runtime dependencies
# only (never the `dev` extra), into a virtual environment; the runtime stage copies that environment
# onto a clean python:3.11-slim and runs it as an unprivileged user. Settings come from DETECTOR_*
# environment variables (docs/configuration.md); the process handles SIGTERM (graceful stop) and
# SIGHUP (registry reload) itself, as PID 1.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Optional runtime extras to install with the detector (comma-separated): `uvloop` lets
# DETECTOR_USE_UVLOOP=true run the event loop on uvloop. Set it to "" for none.
ARG EXTRAS=uvloop

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY detector ./detector

RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/detector \
 && wheel="$(ls /wheels/*.whl)" \
 && /opt/detector/bin/pip install "${wheel}${EXTRAS:+[${EXTRAS}]}" \
 && /opt/detector/bin/pip uninstall --yes pip setuptools \
 && /opt/detector/bin/detector --version \
 && /opt/detector/bin/python -c "import detector.service.app, detector.aws; from detector.demo import sample_world, world_messages; assert world_messages(sample_world())"

# --- runtime ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="ec2-credential-detector" \
      org.opencontainers.image.description="Real-time detector of stolen EC2 instance credentials (CloudTrail from Kafka in, GuardDuty-shaped findings out)" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 detector \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin detector

COPY --from=builder /opt/detector /opt/detector

ENV PATH="/opt/detector/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DETECTOR_HTTP_HOST=0.0.0.0 \
    DETECTOR_HTTP_PORT=9108 \
    DETECTOR_LOG_FORMAT=json

WORKDIR /opt/detector
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# /metrics, /healthz, /readyz
EXPOSE 9108
STOPSIGNAL SIGTERM

# No curl in the slim image: the interpreter is the probe. /healthz is 200 while the event loop and the
# consumer are alive (a broker outage makes the service unready, not unhealthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DETECTOR_HTTP_PORT', '9108'), timeout=4)"]

ENTRYPOINT ["detector"]
CMD ["run"]
