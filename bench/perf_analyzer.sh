#!/usr/bin/env bash
# Triton's perf_analyzer against a local `hornet serve` over the Open Inference Protocol.
#
#   bench/perf_analyzer.sh MODEL_DIR [CONCURRENCY_RANGE] [BATCH]
#
# Starts `python -m service` on a free loopback port over MODEL_DIR (a classification
# bundle), waits for /v2/health/ready, runs perf_analyzer on the bundle's uint8 `image`
# tensor sent as binary data (zero-filled pixels: every request costs the same), prints
# its table, and stops the server. Needs the real perf_analyzer binary on PATH: PyPI's
# `perf-analyzer` >= 2.x wheel, or Triton's SDK container (see docs/kserve-v2.md).
set -euo pipefail

model_dir=${1:?usage: bench/perf_analyzer.sh MODEL_DIR [CONCURRENCY_RANGE] [BATCH]}
concurrency=${2:-1:8:1}
batch=${3:-1}
python=${PYTHON:-python}

if ! command -v perf_analyzer >/dev/null 2>&1; then
    echo "perf_analyzer is not on PATH. Install it with 'pip install \"perf-analyzer>=2\"'" \
         "(Linux x86_64/aarch64 wheels) or run this from nvcr.io/nvidia/tritonserver:<yy.mm>-py3-sdk." >&2
    exit 3
fi

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t hornet-perf-analyzer.XXXXXX.log)
"$python" -m service --model-dir "$model_dir" --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 600); do
    if curl -fs "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then echo "server exited:" >&2; cat "$log" >&2; exit 1; fi
    sleep 0.1
done
model=$(curl -fs "http://127.0.0.1:$port/v1/models" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["models"][0]["name"])')
shape=$(curl -fs "http://127.0.0.1:$port/v2/models/$model" | "$python" -c 'import json, sys; print(",".join(map(str, json.load(sys.stdin)["inputs"][0]["shape"][1:])))')
data=$(mktemp -t hornet-perf-analyzer.XXXXXX.json)
"$python" - "$data" "$shape" <<'PY'
import json, sys
path, shape = sys.argv[1], [int(d) for d in sys.argv[2].split(",")]
count = 1
for d in shape:
    count *= d
# One zero-filled image for the `image` input only: `encoded_image` is optional and omitted.
json.dump({"data": [{"image": {"content": [0] * count, "shape": shape}}]}, open(path, "w"))
PY

echo "perf_analyzer: model $model, input image [$shape] UINT8, batch $batch, concurrency $concurrency"
perf_analyzer -m "$model" -u "127.0.0.1:$port" -i http \
    --input-data "$data" -b "$batch" \
    --concurrency-range "$concurrency" \
    --measurement-interval 5000 --stability-percentage 20 \
    --percentile 95
