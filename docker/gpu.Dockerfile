# HorNet Serve, GPU images: CUDA 13 + cuDNN 9, ONNX Runtime GPU and TensorRT 11.
#
#   docker build -f docker/gpu.Dockerfile --target serve  -t hornet-serve-gpu:0.1.0 .
#   docker build -f docker/gpu.Dockerfile --target export -t hornet-export:0.1.0 .
#
# serve:  the service, no torch.
# export: `hornet export` (torch + TensorRT builder; OpenVINO, which verifies bf16 and
#         int8 bundles for CPU serving). TensorRT engines are tied to the GPU architecture
#         and TensorRT version that built them: run this image on the GPU type that will
#         serve (docs/deploy.md), with the TensorRT pin of the serve image.
#
# Needs an NVIDIA driver >= 580 on the node (CUDA 13). Build context is the repository root.
# Bundles are mounted under /models; HORNET_MODEL_DIR lists the bundle directories.
#
# onnxruntime and onnxruntime-gpu both install the module `onnxruntime`: these images get
# only onnxruntime-gpu. pyproject.toml lists onnxruntime as a core dependency, so the
# package is installed with --no-deps over the lock (docker/requirements-gpu.txt), which
# docker/lock_requirements.py derives from pyproject.toml with that one swap.

FROM nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04 AS base

# Ubuntu 24.04's Python is 3.12. Apt versions are not pinned: the CUDA tag pins the
# release, and exact Ubuntu package versions are withdrawn when security updates land.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hornet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin hornet \
    && mkdir /models

# LD_LIBRARY_PATH: ONNX Runtime's TensorRT provider dlopens libnvinfer, which the pip
# wheel puts in site-packages; kept in front of the base image's own entries.
# HOME=/tmp: the root filesystem is read-only in Kubernetes; /tmp is the writable emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/tensorrt_libs:$LD_LIBRARY_PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp


FROM base AS venv

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements-tensorrt.txt /tmp/requirements-tensorrt.txt
RUN pip install --no-deps --only-binary=:all: --extra-index-url https://pypi.nvidia.com \
    -r /tmp/requirements-tensorrt.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hornet_cli ./hornet_cli
COPY hornet_bundle ./hornet_bundle
COPY model_export ./model_export
COPY service ./service


FROM venv AS serve-builder

COPY docker/requirements-gpu.txt /tmp/requirements.txt
# No `pip check`: it would report onnxruntime missing, which onnxruntime-gpu provides.
# The import below proves the GPU build (with the CUDA and TensorRT providers) is the one.
RUN pip install --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && pip install --no-deps --no-build-isolation . \
    && python -c "import onnxruntime as ort; p = ort.get_available_providers(); assert {'CUDAExecutionProvider', 'TensorrtExecutionProvider'} <= set(p), p" \
    && hornet serve --help > /dev/null


FROM venv AS export-builder

COPY docker/requirements-export.txt /tmp/requirements.txt
# OpenVINO: `--verify-precision bf16` and `--int8` verify on the CPU it runs on.
RUN pip install --no-deps --only-binary=:all: -r /tmp/requirements.txt \
    && pip install --no-deps --no-build-isolation . \
    && python -c "import openvino as ov; d = ov.Core().available_devices; assert 'CPU' in d, d" \
    && hornet export --help > /dev/null


FROM base AS export

COPY --from=export-builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
# The Job or `docker run` passes the export flags; alone it prints them.
ENTRYPOINT ["hornet", "export"]
CMD ["--help"]


# Last stage, so a plain `docker build` gives the server.
FROM base AS serve

COPY --from=serve-builder /opt/venv /opt/venv
ENV HORNET_HOST=0.0.0.0 \
    HORNET_PORT=8000 \
    HORNET_ENGINE=tensorrt \
    HORNET_DEVICE=cuda
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# Liveness only (/healthz); service.healthcheck: python's urllib (no curl), HTTP or HTTPS.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]

# Exec form: the server is PID 1 and receives SIGTERM itself, which starts its drain.
ENTRYPOINT ["hornet"]
CMD ["serve"]
