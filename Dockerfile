# vqtok inference service: ONNX Runtime on CPU, no torch. Serves the bundle in artifacts/default.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VQTOK_MODEL_DIR=/app/artifacts/default

WORKDIR /app
# Only what the server needs: the torch-free service package and the bundle (no models/, no training/).
COPY pyproject.toml README.md ./
COPY service ./service
COPY artifacts/default ./artifacts/default
# The project itself is the package installed here; its dependencies are pinned by pyproject.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cpu]" \
    && useradd --create-home --uid 10001 vqtok
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"]
CMD ["vqtok", "serve", "--host", "0.0.0.0", "--port", "8000"]
