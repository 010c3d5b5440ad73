"""One Global Filter branch per DFT-free form, timed in ONNX Runtime per feature size.

    python bench/gf_modes.py [--sizes 7,14,24] [--channels 240] [--batch 1,8] [--threads 0]

For each square feature size, the global branch of one GF layer (random filter) is
built in each exact DFT-free form of model_export.gf_rewrite (matmul, dense_dft,
circular_conv), exported alone to ONNX, checked against numpy's FFT, and run in
alternating rounds; the table gives the median time per call. This is the measurement
behind gf_rewrite's `auto` choice. Nothing is asserted; it prints measurements.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

import numpy as np

MODES = ("matmul", "dense_dft", "circular_conv")


def branch(mode: str, spectrum: np.ndarray, size: tuple[int, int]):
    from model_export import gf_rewrite

    if mode == "circular_conv":
        return gf_rewrite.CircularConvGlobalBranch(gf_rewrite.spectrum_kernels(spectrum, size))
    cls = {"matmul": gf_rewrite.MatMulGlobalBranch, "dense_dft": gf_rewrite.DenseDFTGlobalBranch}[
        mode
    ]
    return cls(spectrum, size)


def session(module, x, threads: int):
    import onnxruntime as ort
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(
        module.eval(),
        (torch.from_numpy(x),),
        buffer,
        dynamo=True,
        opset_version=20,
        input_names=["x"],
        dynamic_shapes=None,
        verbose=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="7,14,24")
    parser.add_argument("--channels", type=int, default=240)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument(
        "--threads", type=int, default=0, help="0: ONNX Runtime's default (all cores)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'size':>5} {'batch':>5} " + " ".join(f"{m + ' ms':>16}" for m in MODES) + "   fastest")
    for side in (int(s) for s in args.sizes.split(",")):
        size = (side, side)
        bins = side // 2 + 1
        spectrum = rng.standard_normal((args.channels, side, bins)) + 1j * rng.standard_normal(
            (args.channels, side, bins)
        )
        for batch in (int(b) for b in args.batch.split(",")):
            x = rng.standard_normal((batch, args.channels, side, side)).astype(np.float32)
            want = np.fft.irfft2(np.fft.rfft2(x, norm="ortho") * spectrum, s=size, norm="ortho")
            sessions = {}
            for mode in MODES:
                sess = session(branch(mode, spectrum, size), x, args.threads)
                got = sess.run(None, {"x": x})[0]
                error = np.abs(got - want).max() / np.abs(want).max()
                if error > 1e-5:
                    raise SystemExit(f"{mode} at {size} is off by {error:.1e} relative")
                sessions[mode] = sess
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.rounds):
                for mode, sess in sessions.items():
                    count, start = 0, time.perf_counter()
                    while time.perf_counter() - start < args.seconds or count < 3:
                        sess.run(None, {"x": x})
                        count += 1
                    times[mode].append((time.perf_counter() - start) / count * 1e3)
            medians = {m: statistics.median(t) for m, t in times.items()}
            print(
                f"{side:>5} {batch:>5} "
                + " ".join(f"{medians[m]:>16.3f}" for m in MODES)
                + f"   {min(medians, key=medians.get)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
