"""The serving bench's baseline: the plain FastAPI app anyone would write first.

One ONNX Runtime call per request on every core (ORT's own defaults otherwise, spinning included),
no batching, FastAPI's UploadFile and its default JSON answer. The same route and answer shape as
``POST /v1/encode`` for model-sized images, so ``bench/serve_load.py`` drives both with one body.

    python bench/plain_app.py --model artifacts/default --port 8001
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.bundle import ENCODER, Bundle


def make_app(model: Path) -> FastAPI:
    bundle = Bundle.load(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(bundle.path(ENCODER)), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    app = FastAPI()

    @app.post("/v1/encode")
    def encode(images: list[UploadFile]):  # a plain def: FastAPI runs it in its thread pool
        pixels = np.stack([np.asarray(Image.open(f.file).convert("RGB")) for f in images])
        out = dict(zip(names, sess.run(None, {"images": pixels})))
        return {"model": bundle.name, "items": [{"height": int(pixels.shape[1]), "width": int(pixels.shape[2]),
                                                 **{k: v[i].tolist() for k, v in out.items()}}
                                                for i in range(len(pixels))]}

    @app.get("/readyz")
    def readyz():
        return {"status": "ready"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    uvicorn.run(make_app(args.model), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
