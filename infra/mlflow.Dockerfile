# The Helm chart's MLflow tracking server: mlflow with its `auth` extra (Flask-WTF, for the chart's
# mlflow.auth: `mlflow server --app-name basic-auth`), boto3 (artifacts on S3) and psycopg2 (runs in an
# external PostgreSQL), nothing of the trainer. The official image (ghcr.io/mlflow/mlflow) has no psycopg2.
# The chart also runs `mlflow db upgrade` with this image (initContainer db-upgrade) before the server starts.
#   docker build -f infra/mlflow.Dockerfile -t ttt-platform/mlflow:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# Keep it at the version the training image's client has (the chart relies on MLflow 3.5+ host checks).
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "boto3>=1.34" "psycopg2-binary>=2.9" \
 && mlflow --version && python -c "import flask_wtf, psycopg2, boto3"

# Non-root, as the chart's securityContext requires; the chart mounts /mlflow and /tmp.
RUN useradd --uid 1000 --gid 0 --no-create-home mlflow
USER 1000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
