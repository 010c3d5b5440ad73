# HorNet Serve, CPU image: ONNX Runtime and OpenVINO (CPU), no torch, no CUDA.
#
#   docker build -f docker/cpu.Dockerfile -t hornet-serve-cpu:0.1.0 .
#   docker run --stop-timeout 40 -p 8000:8000 -v "$PWD/bundles:/models:ro" \
#     -e HORNET_MODEL_DIR=/models/hornet_tiny_7x7 hornet-serve-cpu:0.1.0
#
# Build context is the repository root; docker/cpu.Dockerfile.dockerignore keeps it small.
# Bundles are not baked in: mount them under /models and list the bundle directories in
# HORNET_MODEL_DIR (comma-separated); see docs/deploy.md. ONNX Runtime is the default
# engine; HORNET_ENGINE=openvino (with HORNET_PRECISION=bf16 on CPUs with AVX512_BF16 or
# AMX) is the faster one, and `hornet tune /models/<bundle>` in this image measures which
# flags serve a bundle fastest on the node it runs on (docs/deploy.md).

FROM python:3.11.14-slim-trixie AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# The lock first, so editing the code does not re-download the dependencies.
# --no-deps: the lock is the whole closure; `pip check` below proves it is.
COPY docker/requirements-cpu.txt /tmp/requirements.txt
RUN pip install --no-deps --only-binary=:all: -r /tmp/requirements.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY hornet_cli ./hornet_cli
COPY hornet_bundle ./hornet_bundle
COPY model_export ./model_export
COPY service ./service
# A regular (not editable) install, so /src is not needed at run time. The build backend
# comes from the lock, not from an unpinned build-isolation download.
# The import proves OpenVINO's CPU plugin loads (`--engine openvino`).
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && python -c "import openvino as ov; d = ov.Core().available_devices; assert 'CPU' in d, d" \
    && hornet serve --help > /dev/null


FROM python:3.11.14-slim-trixie AS serve

# Numeric IDs so Kubernetes can verify runAsNonRoot without resolving names.
RUN groupadd --system --gid 10001 hornet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin hornet \
    && mkdir /models

COPY --from=builder /opt/venv /opt/venv

# HOME=/tmp: the root filesystem is read-only in Kubernetes; /tmp is the writable emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HORNET_HOST=0.0.0.0 \
    HORNET_PORT=8000 \
    HORNET_ENGINE=onnxruntime \
    HORNET_DEVICE=cpu

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# Liveness only (/healthz): warm-up can take minutes and readiness is the orchestrator's job.
# service.healthcheck: python's urllib (the slim image has no curl), HTTP or HTTPS.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]

# Exec form: the server is PID 1 and receives SIGTERM itself, which starts its drain.
ENTRYPOINT ["hornet"]
CMD ["serve"]
