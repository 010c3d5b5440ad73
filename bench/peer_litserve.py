"""A LitServe server for bench/peers.py: a HorNet classifier bundle in our service's own
engine (`service.engines.create_engine`: ONNX Runtime, or OpenVINO in fp32, bf16 or
int8), behind LitServe's own batching, answering a raw image body with its top-5.

    .venv-peers/bin/python bench/peer_litserve.py --model-dir BUNDLE --port 8300

The transform is our service's for the bundle (Pillow decode, EXIF orientation, RGB,
`hornet_bundle.preprocess.classification_input` from the manifest), the engine is built
by our service's code from our server's settings (`--engine`, `--precision`, `--threads`
per engine, spinning between runs only with `--spinning`), so that only the server
around it differs. LitServe runs `--workers` inference workers (one engine each) and
batches up to `--max-batch-size` requests for `--batch-timeout` seconds in each, which
decodes them one by one, stacks them (LitAPI's default `batch`) and runs them as one
batch. LitServe parses only JSON or form bodies by itself; the raw
body reaches decode_request through a FastAPI dependency. No `from __future__ import
annotations` here: LitServe reads decode_request's annotation as an object.
"""

import argparse
import io
from typing import Annotated

import litserve as ls
import numpy as np
from fastapi import Depends, Request
from PIL import Image, ImageOps

from hornet_bundle import load_bundle
from hornet_bundle.preprocess import classification_input
from service.engines import create_engine
from service.pipelines import pipeline_for
from service.settings import Settings

TOP_K = 5


async def raw_body(request: Request) -> bytes:
    return await request.body()


class HorNetClassifier(ls.LitAPI):
    def __init__(self, model_dir: str, engine: Settings, **batching):
        super().__init__(**batching)
        self.model_dir, self.engine_settings = model_dir, engine

    def setup(self, device: str) -> None:
        bundle = load_bundle(self.model_dir)
        self.preprocess, self.labels = bundle.manifest.preprocess, bundle.manifest.labels
        self.pipeline = pipeline_for(bundle.manifest)
        self.engine = create_engine(bundle, self.engine_settings)

    def decode_request(self, request: Annotated[bytes, Depends(raw_body)]) -> np.ndarray:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(request))).convert("RGB")
        return classification_input(image, self.preprocess)

    def predict(self, images: np.ndarray) -> np.ndarray:
        logits = np.stack(self.pipeline.run_batch(self.engine, list(images))).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return exp / exp.sum(axis=-1, keepdims=True)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        order = np.argsort(-probabilities, kind="stable")[:TOP_K]
        return {
            "top_k": [
                {"index": int(i), "label": self.labels[i], "score": float(probabilities[i])}
                for i in order
            ]
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="each engine's threads")
    parser.add_argument("--workers", type=int, default=1, help="inference workers")
    parser.add_argument(
        "--spinning", action="store_true", help="intra-op threads spin between runs too"
    )
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--static-shapes", action="store_true", help="OpenVINO: --openvino-static-shapes"
    )
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    engine = Settings(
        model_dir=[args.model_dir], engine=args.engine, precision=args.precision,
        engine_threads=args.threads, engine_spinning=args.spinning,
        max_batch_size=args.max_batch_size, openvino_static_shapes=args.static_shapes,
    )  # fmt: skip
    api = HorNetClassifier(
        args.model_dir, engine, max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
