"""Writes grpc_predict_v2.binpb, the compiled form of grpc_predict_v2.proto with the
model_config.proto it imports and health.proto (a FileDescriptorSet), with grpcio-tools'
protoc: a development dependency; the server reads the file with protobuf alone.

    python -m service.grpc_v2.generate
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"
PROTOS = ("model_config.proto", PROTO, "health.proto")
DESCRIPTORS = "grpc_predict_v2.binpb"


def compiled(proto_dir: Path = HERE) -> bytes:
    """The FileDescriptorSet protoc makes of the protocol files in `proto_dir`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / DESCRIPTORS
        argv = ["protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}", *PROTOS]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS} in {proto_dir}")
        return out.read_bytes()


def main() -> None:
    (HERE / DESCRIPTORS).write_bytes(compiled())
    print(f"wrote {HERE / DESCRIPTORS}", file=sys.stderr)


if __name__ == "__main__":
    main()
