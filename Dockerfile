# One image for api and worker; the command picks the role.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BAKEHOUSE_DATA_DIR=/data
WORKDIR /app
RUN useradd --create-home --uid 1000 bakehouse && mkdir -p /data && chown bakehouse /data
COPY pyproject.toml README.md ./
COPY api api
COPY baking baking
COPY cli cli
COPY core core
COPY migrations migrations
COPY models models
COPY worker worker
COPY alembic.ini ./
# The CPU torch wheel by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# for GPU workers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "$TORCH_INDEX" .
USER bakehouse
EXPOSE 8000
CMD ["bakehouse", "api", "--host", "0.0.0.0", "--port", "8000"]
