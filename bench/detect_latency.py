"""Per-image latency of the served Cascade Mask R-CNN HorNet-T GF against the same model
in eager torch and in mmdet's own code, side by side in one run (issue P10, item 7).

    python bench/detect_latency.py [--checkpoint FILE.pth] [--bundle DIR] [--rounds 3]
    python bench/detect_latency.py --profile --bundle DIR [--rounds 2]

The scikit-image photographs astronaut, coffee and chelsea (fitted to (1333, 800):
800x800, 800x1200, 800x1203) are written as PNG files, and each goes through
  (a) served: `python -m service --model-dir BUNDLE --engine-threads 2`, the PNG POSTed
      as the body of /detect?score_threshold=0.05, timed by the client end to end
      (decode, fit, engine, mask pasting, RLE, JSON);
  (b) eager: model_export's torch model with mmdet's test pipeline on the host
      (model_export.mmdet_pipeline prepare/finish: boxes in the photo's pixels, binary
      full-size masks), from the same PNG bytes, torch.set_num_threads(2), no_grad;
  (c) mmdet: mmdet 2.28's `inference_detector` on the same checkpoint, the official code
      path, in the OpenMMLab environment .venv-mm when there is one (mmdet's CascadeRCNN
      with our HorNet registered as `HorNet` and mmcv's RoIAlign/NMS kernels on
      torchvision's, as tests/crosscheck/mmdet_reference.py builds it).
Each runs in a process of its own, loaded once and warmed on one photograph; then
--rounds rounds each time every system on every photograph, the systems' order rotating
from round to round. Printed: the median per-image latency of each system, the ratios
eager / served and mmdet / served (median of the per-photograph, per-round ratios, with
their range), each process's resident memory once loaded and its peak (VmHWM), and how
the systems' detections agree (count, largest score difference): the check that they
ran the same weights.

Without --checkpoint the model gets seeded, trained-like weights (the recipe of
tests/helpers/dense_tiny.py `randomize_`: layer scales ~0.3, class weights x16, so
it makes 100 detections per photograph as a trained detector does), saved as an mmdet
checkpoint that all three systems load strictly. The bundle is exported from that file
once (model_export.export, verified against torch) unless --bundle names one exported
from it.

--profile runs the bundle's ONNX Runtime session as the server builds it (2 intra-op
threads, no spinning) on one fitted photograph with ONNX Runtime's profiler and prints
where the time goes (by op type, by module, top nodes), then the eager torch model's
time per module on the same photograph (forward hooks); then it times a few session
settings against the server's in rounds of one run each and says whether their outputs
are bitwise those of the server's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CROSSCHECK = REPO / "tests" / "crosscheck"
sys.path.insert(0, str(REPO))

from tests.helpers.dense_tiny import randomize_  # noqa: E402
from tests.helpers.memory import memory_of  # noqa: E402

VARIANT = "cascade_mask_rcnn_hornet_tiny_gf"
PHOTOS = ("astronaut", "coffee", "chelsea")
SYSTEMS = ("served", "eager", "mmdet")
THREADS = 2
SEED = 11
FC_CLS_SCALE = 16.0  # mmdet_reference.FC_CLS_SCALE["CascadeRCNN"]
SCORE_THRESHOLD = 0.05
MM_VENV = Path(os.environ.get("HORNET_MM_VENV", REPO / ".venv-mm"))
# Loading a full-size detector and warming it takes minutes on a busy 2-core host.
READY_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 900


# ---------------------------------------------------------------- weights and bundle


def seeded_checkpoint(path: Path, seed: int) -> None:
    """The variant with seeded weights, saved in the release's layout (state_dict + meta
    CLASSES), which our loader and mmcv's `load_checkpoint` both read strictly."""
    import torch

    from model_export import create_model
    from model_export.labels import coco_classes

    model = create_model(VARIANT)
    randomize_(model, seed, fc_cls_scale=FC_CLS_SCALE)
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": coco_classes()}}, path)


def export_bundle(checkpoint: Path, out: Path) -> None:
    from model_export.export import ExportOptions, export

    start = time.perf_counter()
    options = ExportOptions(
        checkpoint=checkpoint,
        progress=lambda message: print(f"  [{time.perf_counter() - start:5.0f} s] {message}"),
    )
    export(VARIANT, out, options)


def write_photos(folder: Path) -> dict[str, Path]:
    from PIL import Image
    from skimage import data

    paths = {}
    for name in PHOTOS:
        paths[name] = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(paths[name])
    return paths


# ---------------------------------------------------------------- the three systems


class Worker:
    """A detector in a process of its own (this script with --worker), asked one photo
    at a time over a pipe; it answers a JSON line with its detections' scores."""

    def __init__(self, python: Path, kind: str, checkpoint: Path, log: Path) -> None:
        command = [str(python), __file__, "--worker", kind, "--checkpoint", str(checkpoint)]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        if kind == "mmdet":
            env["PYTHONPATH"] = ""
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                cwd=REPO,
            )
        self.log = log
        self._read()  # "ready", once the model is loaded

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {self.process.args[3]} exited; {self.log}:\n{tail}")
        return json.loads(line)

    def detect(self, photo: Path) -> dict:
        self.process.stdin.write(f"{photo}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def serve_worker(kind: str, checkpoint: Path) -> None:
    """The --worker side: load, say ready, then detect on each photo path read."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print goes to the log, not the pipe
    detect = eager_detector(checkpoint) if kind == "eager" else mmdet_detector(checkpoint)
    channel.write(json.dumps({"ready": kind}) + "\n")
    channel.flush()
    for line in sys.stdin:
        scores = detect(Path(line.strip()))
        channel.write(json.dumps({"scores": sorted(scores, reverse=True)}) + "\n")
        channel.flush()


def eager_detector(checkpoint: Path) -> Callable[[Path], list[float]]:
    """(b): model_export's torch model and mmdet's test pipeline on the host."""
    import torch
    from PIL import Image

    from model_export import create_model
    from model_export.mmdet_pipeline import finish, prepare

    torch.set_num_threads(THREADS)
    model = create_model(VARIANT, checkpoint=checkpoint)
    mean, std = model.pretrained_cfg.mean, model.pretrained_cfg.std

    def detect(photo: Path) -> list[float]:
        rgb = np.asarray(Image.open(io.BytesIO(photo.read_bytes())).convert("RGB"))
        prepared = prepare(rgb, mean, std)
        with torch.no_grad():
            (result,) = model(prepared.image, [prepared.image_shape])
        return finish(result, prepared)["scores"].tolist()

    return detect


def mmdet_detector(checkpoint: Path) -> Callable[[Path], list[float]]:
    """(c): mmdet's CascadeRCNN from the official config with our HorNet registered
    (importing mmdet_reference registers it and installs the RoIAlign/NMS kernels),
    `inference_detector` on the image file."""
    sys.path[:0] = [str(CROSSCHECK), str(REPO)]
    import mmdet_reference  # noqa: F401
    import torch
    from mmcv import Config
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import load_checkpoint
    from mmdet.apis import inference_detector, init_detector
    from mmdet_configs import CONFIGS

    torch.set_num_threads(THREADS)
    model = revert_sync_batchnorm(init_detector(Config(CONFIGS[VARIANT]), device="cpu")).eval()
    loaded = load_checkpoint(model, str(checkpoint), map_location="cpu", strict=True)
    model.CLASSES = tuple(loaded["meta"]["CLASSES"])

    def detect(photo: Path) -> list[float]:
        with torch.no_grad():
            boxes, _ = inference_detector(model, str(photo))
        return [float(s) for class_boxes in boxes for s in class_boxes[:, 4]]

    return detect


class Served:
    """(a): POST the PNG to the server; the scores of its detections."""

    def __init__(self, url: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False)

    def detect(self, photo: Path) -> dict:
        response = self.client.post(
            "/detect",
            params={"score_threshold": SCORE_THRESHOLD},
            content=photo.read_bytes(),
            headers={"Content-Type": "image/png"},
        )
        response.raise_for_status()
        (result,) = response.json()["results"]
        scores = sorted((d["score"] for d in result["detections"]), reverse=True)
        return {"scores": scores}


@contextlib.contextmanager
def systems(bundle: Path, checkpoint: Path, work: Path) -> Iterator[dict]:
    """Each system loaded and ready: name -> (detect, pid)."""
    from service.testing import running_server

    flags = ["--model-dir", str(bundle), "--engine-threads", str(THREADS)]
    flags += ["--request-timeout-s", str(REQUEST_TIMEOUT_S), "--log-level", "warning"]
    with contextlib.ExitStack() as stack:
        print("starting the server ...", flush=True)
        server = stack.enter_context(
            running_server(flags, log_path=work / "server.log", ready_timeout_s=READY_TIMEOUT_S)
        )
        found = {"served": (Served(server.url).detect, server.process.pid)}
        kinds = [("eager", Path(sys.executable))]
        mm_python = MM_VENV / "bin" / "python"
        if (MM_VENV / ".installed").is_file():
            kinds.append(("mmdet", mm_python))
        else:
            print(
                f"mmdet's inference_detector skipped: no OpenMMLab environment at {MM_VENV} "
                "(make mm-env)"
            )
        for kind, python in kinds:
            print(f"loading the {kind} model ...", flush=True)
            worker = Worker(python, kind, checkpoint, work / f"{kind}.log")
            stack.callback(worker.close)
            found[kind] = (worker.detect, worker.process.pid)
        yield found


# ---------------------------------------------------------------- measuring


def measure(found: dict, photos: dict[str, Path], rounds: int) -> dict:
    """Warm each system on the first photo, then `rounds` rounds over every photo and
    system, the systems' order rotating. Returns wall and CPU seconds
    [system][photo] (one per round), the first round's answers, and each process's
    memory once loaded."""
    from loadgen import cpu_seconds  # needs the project environment, where this runs

    names = list(found)
    loaded = {name: memory_of(pid) for name, (_, pid) in found.items()}
    first = next(iter(photos.values()))
    for name in names:
        start = time.perf_counter()
        found[name][0](first)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    wall = {name: defaultdict(list) for name in names}
    cpu = {name: defaultdict(list) for name in names}
    answers: dict = defaultdict(dict)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for photo, path in photos.items():
            for name in order:
                detect, pid = found[name]
                start, cpu_start = time.perf_counter(), cpu_seconds([pid])
                answer = detect(path)
                wall[name][photo].append(time.perf_counter() - start)
                cpu[name][photo].append(cpu_seconds([pid]) - cpu_start)
                answers[photo].setdefault(name, answer["scores"])
            took = ", ".join(
                f"{n} {wall[n][photo][-1]:.1f} s (CPU {cpu[n][photo][-1]:.1f} s)" for n in order
            )
            print(f"round {r + 1}, {photo}: {took}", flush=True)
    return {"wall": wall, "cpu": cpu, "answers": answers, "loaded": loaded}


def report(measured: dict, peaks: dict) -> None:
    print("\nper-image latency (wall clock), median over rounds (s):")
    print_table(measured["wall"])
    print("\nCPU seconds per image (all the process's threads), median over rounds:")
    print_table(measured["cpu"])
    loaded = measured["loaded"]
    print("\nmemory (MiB): resident once loaded (before the first photo), peak (VmHWM) at the end")
    for name in loaded:
        print(
            f"  {name}: {loaded[name]['VmRSS'] / 2**20:.0f} loaded, "
            f"{peaks[name]['VmHWM'] / 2**20:.0f} peak"
        )
    print("\nagreement with the served answers, first round (detections; max |score diff|):")
    for photo, answers in measured["answers"].items():
        served = np.asarray(answers["served"])
        cells = [f"served {len(served)}"]
        for name, scores in answers.items():
            if name != "served":
                other = np.asarray(scores)
                n = min(len(other), len(served))
                diff = float(np.abs(other[:n] - served[:n]).max()) if n else 0.0
                cells.append(f"{name} {len(other)} ({diff:.1e})")
        print(f"  {photo}: " + ", ".join(cells))


def print_table(seconds: dict) -> None:
    """Per photo and over all: each system's median, and each system's time over the
    served time (median of the per-photo, per-round ratios, with their range)."""
    names = list(seconds)
    photos = list(seconds["served"])
    ratios = [f"{name} / served" for name in names[1:]]
    print("| photo | " + " | ".join(names + ratios) + " |")
    print("|---" * (2 * len(names)) + "|")
    for photo in [*photos, "all"]:
        chosen = photos if photo == "all" else [photo]
        cells = [
            f"{statistics.median(t for p in chosen for t in seconds[n][p]):.2f}" for n in names
        ]
        for name in names[1:]:
            paired = [
                other / served
                for p in chosen
                for other, served in zip(seconds[name][p], seconds["served"][p], strict=True)
            ]
            low, high = min(paired), max(paired)
            cells.append(f"**{statistics.median(paired):.2f}** ({low:.2f}-{high:.2f})")
        print(f"| {photo} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- the engine's profile


def session_options(threads: int = THREADS, **changes):
    """The server's ONNX Runtime options (service.engines.OnnxRuntimeEngine with
    --engine-threads 2) with `changes` applied."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    spinning = changes.pop("spinning", False)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for name, value in changes.items():
        setattr(options, name, value)
    return options


def session_variants() -> dict[str, dict]:
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    parallel = ort.ExecutionMode.ORT_PARALLEL
    return {
        "server (ALL, 2 intra, 1 inter, arena, no spin)": {},
        "spinning": {"spinning": True},
        "optimization EXTENDED": {"graph_optimization_level": level.ORT_ENABLE_EXTENDED},
        "optimization BASIC": {"graph_optimization_level": level.ORT_ENABLE_BASIC},
        "1 intra-op thread": {"threads": 1},
        "parallel, 2 inter-op x 1 intra-op": {
            "threads": 1,
            "execution_mode": parallel,
            "inter_op_num_threads": 2,
        },
        "no CPU memory arena": {"enable_cpu_mem_arena": False},
        "no memory pattern": {"enable_mem_pattern": False},
    }


def fitted(photo: str) -> np.ndarray:
    from PIL import Image
    from skimage import data

    from hornet_bundle.preprocess import fit_image

    return fit_image(Image.fromarray(getattr(data, photo)()), (1333, 800), "opencv")


def profile(bundle: Path, checkpoint: Path, work: Path, photo: str, rounds: int) -> None:
    """The engine's profile, eager torch's time per module, then the session settings."""
    import onnxruntime as ort

    path = str(bundle / "model.onnx")
    image = fitted(photo)
    print(f"onnxruntime {ort.__version__}, {photo} fitted to {image.shape[1]}x{image.shape[0]}")
    options = session_options(enable_profiling=True, profile_file_prefix=str(work / "ort"))
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image}
    session.run(None, feed)  # warm-up, then the profiled run
    start = time.perf_counter()
    session.run(None, feed)
    print(f"profiled run: {time.perf_counter() - start:.2f} s")
    print_profile(json.loads(Path(session.end_profiling()).read_text()))
    del session
    eager_profile(checkpoint, photo)
    compare_settings(path, feed, rounds)


def print_profile(events: list[dict]) -> None:
    """The last run's node times: by op type, by module, the top nodes."""
    (run,) = [e for e in events if e.get("name") == "model_run"][-1:]
    nodes = [
        e
        for e in events
        if e.get("cat") == "Node"
        and e["name"].endswith("_kernel_time")
        and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]
    ]
    total = sum(e["dur"] for e in nodes)
    print(
        f"model_run {run['dur'] / 1e3:.0f} ms, {len(nodes)} nodes, {total / 1e3:.0f} ms in kernels"
    )
    by_op: dict = defaultdict(lambda: [0, 0])
    by_module: dict = defaultdict(lambda: [0, 0])
    for e in nodes:
        for table, key in ((by_op, e["args"]["op_name"]), (by_module, module_of(e))):
            table[key][0] += e["dur"]
            table[key][1] += 1
    for title, table, count in (("op type", by_op, 15), ("module", by_module, 20)):
        print(f"\nby {title}:\n| {title} | ms | share | nodes |\n|---|---|---|---|")
        for key, (dur, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:count]:
            print(f"| {key} | {dur / 1e3:.0f} | {dur / total:.1%} | {n} |")
    print("\ntop nodes:\n| node | op | ms | share | output |\n|---|---|---|---|---|")
    for e in sorted(nodes, key=lambda e: -e["dur"])[:15]:
        shape = e["args"].get("output_type_shape", "")
        name = e["name"].removesuffix("_kernel_time")
        print(
            f"| {name} | {e['args']['op_name']} | {e['dur'] / 1e3:.0f} | "
            f"{e['dur'] / total:.1%} | {json.dumps(shape)[:80]} |"
        )


def module_of(node: dict) -> str:
    """A node's module two levels down (`/roi_head/bbox_head.0/...` ->
    `roi_head/bbox_head.0`; `fused /roi_head/...` for ONNX Runtime's fused Gemm); nodes
    named after no module (the RPN's 3x3 conv fused with its ReLU, fused GELUs, layout
    reorders, NMS): `(no module) <op>`."""
    parts = [p for p in node["name"].removeprefix("fused ").split("/") if p]
    if len(parts) < 2:
        return f"(no module) {node['args']['op_name']}"
    if parts[0].startswith(("rpn_cls", "rpn_reg")):
        return "rpn_head (1x1 convs)"
    return "/".join(parts[:2]) if parts[0] in ("roi_head", "backbone") else parts[0]


def eager_profile(checkpoint: Path, photo: str) -> None:
    """Where the eager torch model (b) spends a warm run on `photo`, by module (forward
    hooks; the RPN's convs and proposals are called outside its `forward`, so they are
    in the rest)."""
    import torch
    from skimage import data

    from model_export import create_model
    from model_export.mmdet_pipeline import prepare

    torch.set_num_threads(THREADS)
    model = create_model(VARIANT, checkpoint=checkpoint)
    head = model.roi_head
    modules = {"backbone": model.backbone, "neck": model.neck}
    modules["roi_head/bbox_roi_extractor (3 stages)"] = head.bbox_roi_extractor
    modules |= {f"roi_head/bbox_head.{i}": h for i, h in enumerate(head.bbox_head)}
    modules["roi_head/mask_roi_extractor"] = head.mask_roi_extractor
    modules |= {f"roi_head/mask_head.{i}": h for i, h in enumerate(head.mask_head)}
    spent: dict = defaultdict(float)
    started: dict = {}
    for name, module in modules.items():
        module.register_forward_pre_hook(
            lambda *_, n=name: started.update({n: time.perf_counter()})
        )
        module.register_forward_hook(
            lambda *_, n=name: spent.update({n: spent[n] + time.perf_counter() - started[n]})
        )
    prepared = prepare(getattr(data, photo)(), model.pretrained_cfg.mean, model.pretrained_cfg.std)
    for _ in range(2):  # warm-up, then the measured run
        spent.clear()
        start = time.perf_counter()
        with torch.no_grad():
            model(prepared.image, [prepared.image_shape])
        total = time.perf_counter() - start
    print(f"\neager torch ({torch.__version__}, {THREADS} threads), warm run: {total:.2f} s")
    print("| module | ms | share |\n|---|---|---|")
    for name, seconds in [*spent.items(), ("(RPN and the rest)", total - sum(spent.values()))]:
        print(f"| {name} | {seconds * 1e3:.0f} | {seconds / total:.1%} |")


def compare_settings(path: str, feed: dict, rounds: int) -> None:
    """Each session setting against the server's, in rounds of one run each (the order
    rotating): wall and CPU seconds (this process's threads), and whether the outputs
    are bitwise the server settings' ones."""
    import onnxruntime as ort

    sessions, reference = {}, None
    for name, changes in session_variants().items():
        session = ort.InferenceSession(
            path, session_options(**changes), providers=["CPUExecutionProvider"]
        )
        outputs = session.run(None, feed)  # warm-up; outputs compared with the server's
        reference = outputs if reference is None else reference
        same = all(np.array_equal(a, b) for a, b in zip(outputs, reference, strict=True))
        sessions[name] = (session, "bitwise equal" if same else "DIFFERENT outputs")
    names = list(sessions)
    wall, cpu = defaultdict(list), defaultdict(list)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            sessions[name][0].run(None, feed)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
        print(f"settings round {r + 1} of {rounds} done; {machine()}", flush=True)
    print(
        "\n| session setting | wall s | speed vs server's | CPU s | CPU vs server's | outputs |"
        "\n|---|---|---|---|---|---|"
    )
    for name in names:
        cells = []
        for times in (wall, cpu):
            ratios = [b / t for b, t in zip(times[names[0]], times[name], strict=True)]
            cells.append(
                f"{statistics.median(times[name]):.2f} | {statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f})"
            )
        print(f"| {name} | {cells[0]} | {cells[1]} | {sessions[name][1]} |")


# ---------------------------------------------------------------- main


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="mmdet .pth (default: seeded weights)")
    parser.add_argument("--bundle", type=Path, help="a bundle exported from those weights")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="where files go (default: a temp folder)")
    parser.add_argument("--profile", action="store_true", help="profile the ONNX engine")
    parser.add_argument("--profile-photo", default="astronaut", choices=PHOTOS)
    parser.add_argument("--worker", choices=("eager", "mmdet"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, args.checkpoint)
        return 0
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        print(f"{VARIANT} at (1333, 800); {machine()}", flush=True)
        if args.profile and args.bundle is None:
            parser.error("--profile takes --bundle DIR")
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = work / "seeded.pth"
            print(f"seeded weights (seed {SEED}) -> {checkpoint}", flush=True)
            seeded_checkpoint(checkpoint, SEED)
        if args.profile:
            profile(args.bundle, checkpoint, work, args.profile_photo, args.rounds)
            return 0
        bundle = args.bundle
        if bundle is None:
            bundle = work / "bundle"
            print(f"exporting {checkpoint.name} to {bundle} ...", flush=True)
            export_bundle(checkpoint, bundle)
        photos = write_photos(work)
        with systems(bundle, checkpoint, work) as found:
            measured = measure(found, photos, args.rounds)
            peaks = {name: memory_of(pid) for name, (_, pid) in found.items()}
        print(f"\nafter the rounds: {machine()}")
        report(measured, peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
