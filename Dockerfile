# vqtok inference service: ONNX Runtime on CPU, no torch. Serves the bundle in artifacts/default.
# Dependencies come from requirements/service-cpu.txt, a lock with hashes (python requirements/lock.py
# refreshes it from pyproject.toml), so two builds a month apart install the same files.
# The wheel of vqtok itself is built in a first stage with the locked build backend.
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/build.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VQTOK_MODEL_DIR=/app/artifacts/default
WORKDIR /app
# The locked dependencies first: this layer is rebuilt only when the lock changes. ONNX Runtime's wheel
# also carries its C library for C/C++ programs (capi/libonnxruntime.so, 35 MB: the Python binding is
# a library of its own and never loads it) and its offline model tools (transformers/, quantization/,
# tools/): the server uses none of them, so they go (bench/images.py measures what that saves; the
# container test serves every endpoint without them).
COPY requirements/service-cpu.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt && rm /tmp/requirements.txt \
    && ort="$(python -c 'import importlib.util as u; print(u.find_spec("onnxruntime").submodule_search_locations[0])')" \
    && rm -r "$ort"/capi/libonnxruntime.so.* "$ort"/transformers "$ort"/quantization "$ort"/tools
# Only what the server needs: the torch-free service package and the bundle (no models/, no training/).
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -r /tmp/wheels \
    && useradd --create-home --uid 10001 vqtok
COPY artifacts/default ./artifacts/default
USER 10001

EXPOSE 8000
# vqtok serve finishes requests in flight on SIGTERM for up to VQTOK_GRACEFUL_TIMEOUT_S (default: the
# request timeout + 5 s = 65 s): give `docker stop` that long (docker run --stop-timeout 70; compose
# sets stop_grace_period), or it kills the server after its default 10 s.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"]
CMD ["vqtok", "serve", "--host", "0.0.0.0", "--port", "8000"]
