"""A LitServe server for bench/peers.py: the ONNX graph of a HorNet classifier bundle in
ONNX Runtime, behind LitServe's own batching, answering a raw image body with its top-5.

    .venv-peers/bin/python bench/peer_litserve.py --model-dir BUNDLE --port 8300

The transform is our service's for the bundle (Pillow decode, EXIF orientation, RGB,
`hornet_bundle.preprocess.classification_input` from the manifest), the session has our
server's settings (`--threads` intra-op threads, one inter-op, spinning during runs and
between them only with `--spinning`), and
LitServe batches up to `--max-batch-size` requests for `--batch-timeout` seconds in one
inference worker, which decodes them one by one, stacks them (LitAPI's default `batch`)
and runs them as one batch. LitServe parses only JSON or form bodies by itself; the raw
body reaches decode_request through a FastAPI dependency. No `from __future__ import
annotations` here: LitServe reads decode_request's annotation as an object.
"""

import argparse
import io
from typing import Annotated

import litserve as ls
import numpy as np
import onnxruntime as ort
from fastapi import Depends, Request
from PIL import Image, ImageOps

from hornet_bundle import load_bundle
from hornet_bundle.preprocess import classification_input

TOP_K = 5


async def raw_body(request: Request) -> bytes:
    return await request.body()


class HorNetClassifier(ls.LitAPI):
    def __init__(self, model_dir: str, precision: str, threads: int, spinning: bool, **batching):
        super().__init__(**batching)
        self.model_dir, self.precision = model_dir, precision
        self.threads, self.spinning = threads, spinning

    def setup(self, device: str) -> None:
        bundle = load_bundle(self.model_dir)
        self.preprocess, self.labels = bundle.manifest.preprocess, bundle.manifest.labels
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        # As ours: threads spin during a run, and between runs only when asked.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        stop = "0" if self.spinning else "1"
        options.add_session_config_entry("session.force_spinning_stop", stop)
        graph = bundle.file(bundle.manifest.engine_for("onnx", self.precision).file)
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request: Annotated[bytes, Depends(raw_body)]) -> np.ndarray:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(request))).convert("RGB")
        return classification_input(image, self.preprocess)

    def predict(self, images: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: images})[0].astype(np.float64)
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
    parser.add_argument("--precision", default="fp32", help="the bundle's ONNX graph to serve")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--spinning", action="store_true", help="intra-op threads spin between runs too"
    )
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    api = HorNetClassifier(
        args.model_dir, args.precision, args.threads, args.spinning,
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
    )  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
