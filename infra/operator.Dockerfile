# The operator image: `python -m ttt_operator` with the distribution's base dependencies only (kopf, the
# Kubernetes and MLflow clients, boto3 for S3 progress files, matplotlib for a sweep's plots). No torch, Ray
# or DeepSpeed: those come with the `train` extra, which only infra/Dockerfile installs.
#   docker build -f infra/operator.Dockerfile -t ttt-platform/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# The source tree stays in the image (installed editable): TTTJobs name recipes, found in jobs/recipes.
WORKDIR /opt/ttt
COPY pyproject.toml README.md ./
COPY platform ./platform
COPY operators ./operators
COPY jobs ./jobs
# The build fails if the operator (or closing a sweep) ever needs the trainer's stack.
RUN pip install -e . \
 && python -c "import sys, ttt_operator.handlers, ttt.sweep.local; \
heavy = {'torch', 'ray', 'deepspeed'} & {m.split('.')[0] for m in sys.modules}; \
sys.exit(f'the operator imports {sorted(heavy)}' if heavy else 0)"

# Non-root, as the chart's securityContext requires (the chart points HOME at a writable emptyDir).
RUN useradd --uid 1000 --gid 0 --no-create-home ttt
USER 1000
CMD ["python", "-m", "ttt_operator"]
