# syntax=docker/dockerfile:1
# MLflow tracking server with a PostgreSQL backend store (psycopg2) and an S3-compatible artifact store (boto3).
#
#   docker build -f infra/docker/mlflow.Dockerfile -t samerge-mlflow:3.17.2 infra/docker
#
# Keep MLFLOW_VERSION at or above the mlflow the workers install (the client), and the image tag in
# infra/compose.yaml equal to it.
FROM python:3.11.13-slim-bookworm
ARG MLFLOW_VERSION=3.17.2
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" \
 && useradd --uid 1000 --create-home mlflow
USER mlflow
EXPOSE 5000
# The backend store, artifact destination and allowed hosts come from the command line (see infra/compose.yaml).
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
