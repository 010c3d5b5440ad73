#!/usr/bin/env bash
# The bench-only environment of bench/peers.py: TorchServe 0.12 and LitServe, in a
# virtualenv of their own so neither touches the project's pinned dependencies. Not part
# of `make install` or `make test`. bench/peers.py itself runs from the project's .venv
# and starts the peers with DIR/bin/torchserve and DIR/bin/python. TorchServe's frontend
# needs Java 11 or newer.
# Usage: tools/make_peers_env.sh [DIR] [PYTHON] (default .venv-peers, python3.11).
# Writes DIR/.installed last, only on success.
set -euo pipefail

env_dir=${1:-.venv-peers}
python=${2:-python3.11}
repo=$(cd "$(dirname "$0")/.." && pwd)
pip=("$env_dir/bin/python" -m pip install --quiet)

java -version 2>&1 | head -1
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
# captum: TorchServe's stock vision handlers import it. bench/peer_litserve.py takes the
# raw request body through LitServe 0.2.19's route building: keep that version.
"${pip[@]}" torchserve==0.12.0 torch-model-archiver==0.12.0 captum litserve==0.2.19 \
    onnxruntime pillow numpy httpx
# LitServe's server imports hornet_bundle (the transform) and service (the engine, with
# the openvino extra for --engine openvino).
"${pip[@]}" -e "$repo[openvino]"
"$env_dir/bin/python" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("torch", "torchvision", "torchserve", "torch-model-archiver", "litserve", "onnxruntime", "openvino")))'
touch "$env_dir/.installed"
