"""Engines: one small interface over ONNX Runtime, OpenVINO and native TensorRT, plus plugins.

An engine takes named numpy inputs and returns named numpy outputs; it is called from
one worker thread at a time (the batcher gives each of the K instances its own thread),
so implementations need no locking. Which file an engine loads comes from the bundle's
manifest; nothing is guessed from file names. Engines other packages contribute (the
export side's eager `torch` engine) are found by name under the `hornet.engines` entry
points, so the service imports none of them.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path

import numpy as np

from hornet_bundle import ENGINE_ENTRY_POINTS, Bundle, EngineUnavailable, InferenceEngine
from hornet_bundle import Engine as EngineEntry
from hornet_bundle.host import cpu_model, runtime_cpu
from service.settings import Settings


class OnnxRuntimeEngine:
    """An ONNX Runtime session on CPU, CUDA or the TensorRT execution provider.

    On CUDA the outputs are bound to device memory through IO binding and copied back
    once, so ONNX Runtime does not allocate host staging buffers per run.

    `static_batch` > 0 (on CUDA, --cuda-static-shapes) makes one session per size in
    `static_sizes(static_batch)`, each with the graph's batch axis fixed at its size,
    where the batch is the graph's only dynamic input axis and leads every output; a
    batch runs on the smallest that holds it, padded with zero images, and its outputs
    are cut back. The CUDA provider plans its convolutions again whenever a session's
    input shape differs from its previous run's, shapes it ran before included: on an
    H200 a session warmed at every size took 1-2 s per batch when sizes alternated
    (exhaustive search), while two sessions of one size each, alternating, ran at 7-9 ms
    (docs/gpu.md; an open ONNX Runtime report, microsoft/onnxruntime#23006, has the same
    since 1.20). Each session holds its own copy of the weights on the device.

    `shape_sessions` > 1 (on CUDA, --cuda-shape-sessions) does the same for a graph whose
    batch axis cannot be fixed (the detector, whose input size follows each image's
    aspect ratio): a session per input shape, made when a shape first comes, for the
    `shape_sessions` shapes seen last; the least recently used one is dropped for a new
    shape. Photographs from phones come in a few shapes (landscape and portrait of each
    aspect ratio), so each keeps its session and its plan.

    `sibling()` gives another instance over the same session where that runs as fast
    (--share-weights): see there.
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str = "cpu",
        tensorrt_ep: bool = False,
        precision: str = "fp32",
        threads: int = 0,
        spinning: bool = False,
        cache_dir: Path | None = None,
        tf32: bool = False,
        static_batch: int = 0,
        shape_sessions: int = 0,
        conv_algo_search: str = "exhaustive",
    ) -> None:
        import onnxruntime as ort

        if device == "cuda" and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu >= 1.21: load CUDA/cuDNN from the nvidia-* pip packages when
            # they are installed, so no LD_LIBRARY_PATH is needed outside the GPU image.
            with contextlib.suppress(OSError):
                ort.preload_dlls()
        providers = _ort_providers(
            device, tensorrt_ep, precision, cache_dir, tf32, conv_algo_search
        )
        missing = [name for name, _ in providers if name not in ort.get_available_providers()]
        if missing:
            raise EngineUnavailable(
                f"ONNX Runtime here lacks {missing}; it has {ort.get_available_providers()} "
                "(install onnxruntime-gpu for CUDA/TensorRT)"
            )

        def session(batch: tuple[str, int] | None = None):
            options = ort.SessionOptions()
            # Intra-op threads spin while a run is in progress (the hand-off between the
            # threads of each operator is then immediate) and, unless `spinning`, stop as
            # soon as it returns, so they do not take the cores from the decoding threads
            # and the event loop between runs. bench/README.md, "Server efficiency".
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            options.add_session_config_entry(
                "session.force_spinning_stop", "0" if spinning else "1"
            )
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            if batch is not None:
                options.add_free_dimension_override_by_name(*batch)
            return ort.InferenceSession(
                str(path),
                sess_options=options,
                providers=[p for p, _ in providers],
                provider_options=[o for _, o in providers],
            )

        first = session()
        self._output_names = [o.name for o in first.get_outputs()]
        axis = _batch_axis_name(first) if static_batch else None
        self.static_sizes = static_sizes(static_batch) if axis is not None else ()
        # batch size -> session; one key, 0, for the dynamic session. A named batch axis
        # is fixed in each session; each sees only its own size either way.
        self._sessions = {
            size: session((axis, size) if axis else None) for size in self.static_sizes
        } or {0: first}
        # input shapes -> session, least recently used first (used when shape_sessions).
        self.shape_sessions = shape_sessions if not self.static_sizes and shape_sessions > 1 else 0
        self._by_shape: OrderedDict[tuple, object] = OrderedDict()
        self._new_session = session
        self._on_gpu = device == "cuda"
        self._threads = threads
        sizes = ",".join(map(str, self.static_sizes))
        shapes = f" static batches {sizes}" if self.static_sizes else ""
        if self.shape_sessions:
            shapes = f" a session per input shape (up to {self.shape_sessions})"
        self.description = f"onnxruntime {ort.__version__} {providers[0][0]} {path.name}{shapes}"

    def sibling(self) -> OnnxRuntimeEngine | None:
        """Another instance running this engine's session, so K instances hold one copy of
        the weights, where that is as fast as K sessions: on the CPU with one intra-op
        thread, where a run executes on its caller's thread and runs from several threads
        go side by side (ONNX Runtime's Run is thread-safe). 2 x 1 on two cores, seeded
        hornet_tiny_7x7: 348 MiB against 620, same throughput (bench/README.md). Else
        None: with more threads the runs would share one session's pool, and on CUDA
        one stream."""
        if self._on_gpu or self._threads != 1 or self.shape_sessions or self.static_sizes:
            return None
        return copy.copy(self)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.shape_sessions:
            return self._run(self._session_for(inputs), inputs)
        if not self.static_sizes:
            return self._run(self._sessions[0], inputs)
        count, largest = len(next(iter(inputs.values()))), self.static_sizes[0]
        pieces = [largest] * (count // largest) + ([count % largest] if count % largest else [])
        return run_in_pieces(inputs, pieces, self._run_padded, self._output_names)

    def _session_for(self, inputs: Mapping[str, np.ndarray]):
        """The session kept for these inputs' shapes; a new one (the first session for the
        first shape) when none is, dropping the least recently used past the limit."""
        key = tuple((name, value.shape) for name, value in inputs.items())
        session = self._by_shape.pop(key, None)
        if session is None:
            if len(self._by_shape) >= self.shape_sessions:
                self._by_shape.popitem(last=False)
            session = self._sessions.pop(0) if 0 in self._sessions else self._new_session()
        self._by_shape[key] = session
        return session

    def _run_padded(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The images on the smallest static session that holds them, padded with zeros."""
        count = len(next(iter(inputs.values())))
        size = min(s for s in self.static_sizes if s >= count)
        if size > count:
            inputs = {
                name: np.concatenate(
                    [value, np.zeros((size - count, *value.shape[1:]), value.dtype)]
                )
                for name, value in inputs.items()
            }
        outputs = self._run(self._sessions[size], inputs)
        return {name: value[:count] for name, value in outputs.items()}

    def _run(self, session, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._on_gpu:
            return dict(zip(self._output_names, session.run(None, dict(inputs)), strict=True))
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))

    def close(self) -> None:
        self._sessions = {}
        self._by_shape.clear()


def _batch_axis_name(session) -> str | None:
    """The name of the graph's batch axis ("" where it has none) where static batch
    sessions can stand for the dynamic one: every input and output leads with the same
    dynamic axis and no input has another dynamic axis. None otherwise (the detector:
    its image size varies)."""
    ports = [*session.get_inputs(), *session.get_outputs()]
    leading = {port.shape[0] if port.shape else 0 for port in ports}
    if len(leading) != 1 or isinstance(next(iter(leading)), int):
        return None
    fixed = all(isinstance(dim, int) for port in session.get_inputs() for dim in port.shape[1:])
    return (next(iter(leading)) or "") if fixed else None


def _ort_providers(
    device: str,
    tensorrt_ep: bool,
    precision: str,
    cache_dir: Path | None,
    tf32: bool = False,
    conv_algo_search: str = "exhaustive",
) -> list[tuple[str, dict]]:
    if device == "cpu":
        return [("CPUExecutionProvider", {})]
    providers: list[tuple[str, dict]] = []
    if tensorrt_ep:
        trt_options: dict = {
            "trt_fp16_enable": precision == "fp16",
            "trt_layer_norm_fp32_fallback": True,
        }
        if cache_dir is not None:
            trt_options |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True,
            }
        providers.append(("TensorrtExecutionProvider", trt_options))
    # The CUDA provider runs fp32 convolutions and matmuls in TF32 unless told not to:
    # measured on an H100, that moved this project's logits by 1.3e-3 relative, 100x the
    # fp32 parity tolerance the bundle was verified at. Off unless asked for.
    cuda_options = {"use_tf32": int(tf32), "cudnn_conv_algo_search": conv_algo_search.upper()}
    providers.append(("CUDAExecutionProvider", cuda_options))
    providers.append(("CPUExecutionProvider", {}))
    return providers


class TensorRTEngine:
    """A serialized TensorRT engine run with the TensorRT Python API; memory from torch.

    Engines are tied to the GPU architecture and TensorRT version they were built with,
    so both are checked against the manifest first and a mismatch is refused clearly.
    Outputs must have shapes known once the input shapes are set (no data-dependent
    outputs, i.e. not the detection graph).
    """

    def __init__(self, path: Path, entry: EngineEntry) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise EngineUnavailable(f"the tensorrt engine needs tensorrt and torch: {exc}") from exc
        if not torch.cuda.is_available():
            raise EngineUnavailable("the tensorrt engine needs a CUDA GPU; none is visible")
        major, minor = torch.cuda.get_device_capability()
        here = f"{major}.{minor}"
        if entry.compute_capability and entry.compute_capability != here:
            raise EngineUnavailable(
                f"{path.name} was built for compute capability {entry.compute_capability} "
                f"({entry.gpu_name}); this GPU is {here} ({torch.cuda.get_device_name()})"
            )
        if entry.tensorrt_version and _major_minor(entry.tensorrt_version) != _major_minor(
            trt.__version__
        ):
            raise EngineUnavailable(
                f"{path.name} was built with TensorRT {entry.tensorrt_version}; "
                f"this is TensorRT {trt.__version__}"
            )
        self._trt, self._torch = trt, torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize {path}")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        self.description = f"tensorrt {trt.__version__} {path.name}"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self._torch, self._trt
        with torch.cuda.stream(self._stream):
            keep = []
            for name in self._inputs:
                host = torch.from_numpy(np.ascontiguousarray(inputs[name]))
                tensor = host.cuda(non_blocking=True)
                keep.append(tensor)
                self._context.set_input_shape(name, tuple(tensor.shape))
                self._context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self._outputs:
                shape = tuple(self._context.get_tensor_shape(name))
                if any(dim < 0 for dim in shape):
                    raise EngineUnavailable(f"output {name} has a data-dependent shape {shape}")
                dtype = torch.from_numpy(
                    np.empty(0, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
                ).dtype
                outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 reported failure")
        self._stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def close(self) -> None:
        self._context = None
        self._engine = None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


# OpenVINO's inference precision for each precision it serves: an fp32 graph at f32 or
# bf16, and the int8 graph (its quantized ops run in int8, the rest in f32).
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_runs_bf16() -> bool:
    """True when this CPU has bf16 arithmetic (AVX512_BF16 or AMX-BF16), as OpenVINO's CPU
    plugin reports it (its OPTIMIZATION_CAPABILITIES list BF16), else as /proc/cpuinfo
    does. Without it OpenVINO silently runs bf16 requests in fp32."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def _cpu_name() -> str:
    try:
        import openvino as ov

        return ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    except ImportError:
        return "this CPU"


# Transpose perms around a channels-first LayerNorm exported as permute + F.layer_norm
# (model_export.gnconv.fuse_layer_norms): NCHW -> NHWC before it, back after it.
_TO_CHANNELS_LAST = [0, 2, 3, 1]
_TO_CHANNELS_FIRST = [0, 3, 1, 2]


def unfuse_channel_norms(model, *, normalize_l2: bool = True) -> int:
    """Rewrite, in an OpenVINO model read from a bundle's ONNX graph, each channels-first
    LayerNorm that the exporter wrote as Transpose -> LayerNormalization(last axis) ->
    Transpose (one ONNX node, which ONNX Runtime runs about twice as fast as the written-
    out form) into a norm over the channel axis with the same eps, scale and shift, and
    no Transposes (`_channel_layer_norm`): the same function. OpenVINO's CPU plugin ran
    the fused form's Transposes, Reorders and a Subtract it splits out of the MVN for a
    third of hornet_tiny_7x7's bf16 time; rewritten, two one-thread engines ran 67.1
    img/s against 54.5 (bench/README.md, OpenVINO). Returns how many it rewrote (the manifest's
    `export.fused_layer_norms`, for the classifier and segmenter exporters).
    `normalize_l2` False keeps every norm an MVN (see `_channel_layer_norm`): for static
    shapes, where OpenVINO fuses the MVN's passes itself."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.passes import ConstantFolding, Manager

    # The importer computes each MVN's axes from the input's shape: fold those subgraphs
    # alone (through a model of just them). Folding the whole model would also fold an
    # int8 graph's weight dequantization into fp32 constants: 6.4 img/s instead of 18.6.
    mvns = [op for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]
    if not mvns:
        return 0
    axes = ov.Model([mvn.input_value(1) for mvn in mvns], model.get_parameters(), "mvn_axes")
    folding = Manager()
    folding.register_pass(ConstantFolding())
    folding.run_passes(axes)
    # NHWC output node of each norm rewritten -> its NCHW replacement: the importer merges
    # the Transposes between two norms in a row (a stem norm followed by a stage's), so
    # the second one's input is the first one's NHWC output, not a Transpose.
    channels_first: dict = {}
    rewritten = 0
    for mvn in mvns:
        pattern = _channel_norm_pattern(mvn, channels_first)
        if pattern is None:
            continue
        source, scale, shift, nhwc_out, transposes_back = pattern
        eps = mvn.get_attributes()["eps"]
        as_mvn = rewritten == 0 or not normalize_l2
        out = _channel_layer_norm(ops, source, eps, scale, shift, as_mvn=as_mvn)
        for transpose in transposes_back:
            for target in list(transpose.output(0).get_target_inputs()):
                target.replace_source_output(out.output(0))
        channels_first[nhwc_out.get_instance_id()] = out.output(0)
        rewritten += 1
    model.validate_nodes_and_infer_types()
    return rewritten


def gather_channel_halves(model) -> int:
    """Rewrite, in an OpenVINO model, each Split of a feature map into two halves along
    the channels (the Global Filter layer's local and global halves) as two Gathers of
    those channels: the same tensors. OpenVINO's CPU plugin ran those Splits in its
    reference kernel (hornet_tiny_gf: 248 of 496 channels, no multiple of its 16-channel
    blocks; 46 of 460 ms in bf16 at batch 8 on one thread); the Gathers made the model
    1.08-1.15x faster in bf16 (bench/README.md, OpenVINO). gnConv's VariadicSplits stay:
    as Gathers they ran 0.88-0.98x. Returns how many Splits it rewrote."""
    import openvino.opset13 as ops

    rewritten = 0
    for split in model.get_ordered_ops():
        if split.get_type_name() != "Split" or split.get_output_size() != 2:
            continue
        axis, source = split.input_value(1).get_node(), split.input_value(0)
        shape = source.get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4 or not shape[1].is_static:
            continue
        if axis.get_type_name() != "Constant" or axis.get_data().tolist() not in (1, -3):
            continue
        half = shape[1].get_length() // 2
        for output, start in zip(split.outputs(), (0, half), strict=True):
            channels = ops.constant(np.arange(start, start + half, dtype=np.int64))
            gathered = ops.gather(source, channels, ops.constant(np.int64(1)))
            for target in list(output.get_target_inputs()):
                target.replace_source_output(gathered.output(0))
        rewritten += 1
    model.validate_nodes_and_infer_types()
    return rewritten


def _channel_layer_norm(
    ops, source, eps: float, scale: np.ndarray, shift: np.ndarray, *, as_mvn: bool
):
    """LayerNorm over axis 1 of NCHW `source`. With y = x - mean_C(x),
    LN(x) = y / sqrt(mean_C(y^2) + eps) = sqrt(C) * y / sqrt(sum_C(y^2) + C * eps):
    NormalizeL2 over the channels with C * eps added inside the root and sqrt(C) folded
    into the scale, which OpenVINO's CPU plugin runs as one kernel. MVN over axis 1
    alone has none: the plugin splits it into ReduceMean, Subtract, Power, Sqrt and
    Divide passes; in bf16 the NormalizeL2 form ran the tiny classifiers 1.00-1.09x (7x7)
    and 1.15-1.21x (GF) as fast (bench/README.md, OpenVINO). `as_mvn` keeps the MVN: for
    the stem's norm, where in bf16 NormalizeL2 nearly doubled the demo classifier's
    logit error on photographs (3.2e-2 against 1.7e-2 all MVN, 1.8e-2 with the stem's
    alone as MVN). On static shapes OpenVINO fuses the MVN's passes into its own
    kernels, as fast as NormalizeL2 (0.98-1.03x) and closer to fp32 (1.3e-2 against
    2.3e-2): every norm stays an MVN there."""
    channels = scale.shape[1]
    axis = ops.constant(np.array([1], dtype=np.int64))
    if as_mvn:
        normalized = ops.mvn(source, axis, normalize_variance=True, eps=eps, eps_mode="inside_sqrt")
    else:
        centred = ops.subtract(source, ops.reduce_mean(source, axis, keep_dims=True))
        normalized = ops.normalize_l2(centred, axis, channels * eps, "add")
        scale = (scale * np.sqrt(channels)).astype(np.float32)
    return ops.add(ops.multiply(normalized, ops.constant(scale)), ops.constant(shift))


def _channel_norm_pattern(mvn, channels_first: dict):
    """When the MVN `mvn` is a fused channels-first LayerNorm (see unfuse_channel_norms):
    its NCHW input, scale and shift shaped [1,C,1,1], the node of its NHWC output (the
    shift's Add) and the Transposes back to NCHW that consume it; else None. Anything but
    those and other norms reading the NHWC output leaves the norm as it is."""

    def constant(output) -> list | None:
        node = output.get_node()
        return node.get_data().tolist() if node.get_type_name() == "Constant" else None

    def only_consumer(node):
        consumers = list(node.output(0).get_target_inputs())
        return consumers[0].get_node() if len(consumers) == 1 else None

    if mvn.get_attributes().get("eps_mode") != "INSIDE_SQRT":
        return None
    if constant(mvn.input_value(1)) not in ([-1], [3]):
        return None
    before = mvn.input_value(0).get_node()
    if before.get_instance_id() in channels_first:
        source = channels_first[before.get_instance_id()]
    elif before.get_type_name() == "Transpose":
        if constant(before.input_value(1)) != _TO_CHANNELS_LAST:
            return None
        source = before.input_value(0)
    else:
        return None
    scale_node = only_consumer(mvn)
    if scale_node is None or scale_node.get_type_name() != "Multiply":
        return None
    shift_node = only_consumer(scale_node)
    if shift_node is None or shift_node.get_type_name() != "Add":
        return None
    consumers = [target.get_node() for target in shift_node.output(0).get_target_inputs()]
    transposes_back = [
        node
        for node in consumers
        if node.get_type_name() == "Transpose"
        and constant(node.input_value(1)) == _TO_CHANNELS_FIRST
    ]
    next_norms = sum(node.get_type_name() == "MVN" for node in consumers)
    if not transposes_back or len(transposes_back) + next_norms != len(consumers):
        return None
    scale, shift = constant(scale_node.input_value(1)), constant(shift_node.input_value(1))
    channels = source.get_partial_shape()[1]
    if not (channels.is_static and scale and shift):
        return None
    if not (len(scale) == len(shift) == channels.get_length()):
        return None  # not one value per channel (a scalar, or another axis)
    as_nchw = (1, -1, 1, 1)
    return (
        source,
        np.asarray(scale, np.float32).reshape(as_nchw),
        np.asarray(shift, np.float32).reshape(as_nchw),
        shift_node,
        transposes_back,
    )


class OpenVinoEngine:
    """The bundle's fp32 ONNX graph compiled by OpenVINO for the CPU, run in fp32 or bf16.

    bf16 is OpenVINO's inference precision on the same graph (weights and activations
    rounded to bf16, accumulation in fp32), so it needs no file of its own; the CPU must
    do bf16 arithmetic, else OpenVINO would quietly run fp32 and the request is refused.
    Shapes stay as the graph declares them (dynamic batch, dynamic image size for the
    detector). One synchronous infer request with the LATENCY hint: one stream over
    `threads` cores (0 = all), which the batcher keeps busy with whole batches (the
    THROUGHPUT hint splits the cores into streams a single request cannot use); several
    instances (--instances) are several such engines, their threads left unpinned.

    `static_batch` > 0 (--openvino-static-shapes) compiles, where only the batch axis of
    the graph is dynamic, one static-shape model per batch size in `static_sizes`
    instead, and runs each batch as pieces of those sizes, largest first: OpenVINO fuses
    more on static shapes (its element-wise Subgraphs) and ran hornet_tiny 1.1-1.3x
    faster in bf16, each size costing another compiled model's memory (bench/README.md,
    OpenVINO). The detector's graph, whose image size varies, stays dynamic.

    `streams` > 1 (--instances K with --share-weights) compiles each model as K streams
    of `threads` threads each (all the cores split among them when 0): OpenVINO's own
    form of K engines side by side, one copy of the weights; this engine and each
    `sibling()` run infer requests of their own on it, which take the next free stream.
    OpenVINO makes no more streams than the CPUs it sees (K = 4 on two cores: 2), so
    instances beyond that take turns.
    """

    def __init__(
        self,
        path: Path,
        *,
        precision: str = "fp32",
        threads: int = 0,
        static_batch: int = 0,
        streams: int = 1,
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineUnavailable(
                "the openvino engine needs the openvino package: pip install "
                "'hornet-serve[openvino]'"
            ) from exc
        if precision not in OPENVINO_PRECISIONS:
            raise EngineUnavailable(
                f"the openvino engine runs fp32, bf16 or int8, not {precision} (fp16 graphs "
                "are for CUDA: --engine onnxruntime --device cuda)"
            )
        if precision == "bf16" and not cpu_runs_bf16():
            raise EngineUnavailable(
                f"--precision bf16 needs a CPU with AVX512_BF16 or AMX-BF16, and {_cpu_name()} "
                "has neither (OpenVINO would silently run fp32): use --precision fp32"
            )
        config = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            # OpenVINO pins each compiled model's threads to cores counted from the first:
            # with --instances 2 --engine-threads 1 both instances ran on core 0 (one core
            # busy, half the throughput), and pinned threads cannot make way for decoding.
            "ENABLE_CPU_PINNING": False,
        }
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads * streams
        core = ov.Core()
        model = core.read_model(str(path))
        sizes = static_sizes(static_batch) if static_batch and _only_batch_dynamic(model) else ()
        self.unfused_norms = unfuse_channel_norms(model, normalize_l2=not sizes)
        self.gathered_splits = gather_channel_halves(model)
        # batch size -> compiled model; one key, 0, for the dynamic model.
        models = {size: _with_batch(model, size) for size in sizes} or {0: model}
        compiled = {size: core.compile_model(each, "CPU", config) for size, each in models.items()}
        first = next(iter(compiled.values()))
        # An ov.Type, whose str() is "<Type: 'bfloat16'>": compare the Type itself.
        ran = first.get_property("INFERENCE_PRECISION_HINT")
        if precision == "bf16" and ran != ov.Type.bf16:
            raise EngineUnavailable(
                f"OpenVINO compiled {path.name} for {ran.get_type_name()}, not bf16"
            )
        self._compiled = compiled
        self._requests = {size: each.create_infer_request() for size, each in compiled.items()}
        self._outputs = [(index, port.get_any_name()) for index, port in enumerate(first.outputs)]
        self.static_sizes = sizes
        self.streams = streams
        # OpenVINO caps streams (and their threads) at the CPUs it sees: what it made.
        self.streams_made = int(first.get_property("NUM_STREAMS"))
        shapes = f" static batches {','.join(map(str, sizes))}" if sizes else ""
        shared = f" {self.streams_made} streams" if streams > 1 else ""
        self.description = f"openvino {ov.__version__} CPU {precision} {path.name}{shapes}{shared}"

    def sibling(self) -> OpenVinoEngine | None:
        """Another instance on the same compiled models (another stream), with infer
        requests of its own; None when they were compiled as one stream."""
        if self.streams < 2:
            return None
        other = copy.copy(self)
        other._requests = {
            size: model.create_infer_request() for size, model in self._compiled.items()
        }
        return other

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.static_sizes:
            return self._infer(self._requests[0], inputs)
        pieces = batch_pieces(len(next(iter(inputs.values()))), self.static_sizes)
        return run_in_pieces(
            inputs,
            pieces,
            lambda piece: self._infer(self._requests[len(next(iter(piece.values())))], piece),
            [name for _, name in self._outputs],
        )

    def _infer(self, request, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()})
        # The request reuses its output buffers on the next run: copy them out.
        return {name: np.array(results[index]) for index, name in self._outputs}

    def close(self) -> None:
        self._requests = {}
        self._compiled = {}


def static_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes the static-shape OpenVINO engine compiles, largest first: the
    powers of two below `max_batch` and `max_batch` itself (8: 8, 4, 2, 1; 1 + log2 of
    the max batch models in all)."""
    powers = [1 << bit for bit in range(max_batch.bit_length()) if 1 << bit < max_batch]
    return (max_batch, *reversed(powers))


def run_in_pieces(
    inputs: Mapping[str, np.ndarray],
    pieces: list[int],
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    output_names: list[str],
) -> dict[str, np.ndarray]:
    """`run` on consecutive slices of the batch `pieces` long, outputs joined in order
    (the static-shape engines: OpenVINO's compiled sizes, ONNX Runtime's sessions)."""
    results, start = [], 0
    for size in pieces:
        results.append(run({name: value[start : start + size] for name, value in inputs.items()}))
        start += size
    if len(results) == 1:
        return results[0]
    return {name: np.concatenate([result[name] for result in results]) for name in output_names}


def batch_pieces(count: int, sizes: tuple[int, ...]) -> list[int]:
    """`count` images as batches of `sizes` (largest first, ending with 1), largest
    first: 7 of (8, 4, 2, 1) -> 4, 2, 1; 19 -> 8, 8, 2, 1."""
    pieces = []
    for size in sizes:
        while count >= size:
            pieces.append(size)
            count -= size
    return pieces


def _with_batch(model, size: int):
    """A copy of `model` with its inputs' batch axis fixed at `size`."""
    static = model.clone()
    static.reshape({port: [size, *port.get_partial_shape()[1:]] for port in static.inputs})
    return static


def _only_batch_dynamic(model) -> bool:
    """Every input and output of `model` is batch-major with only its batch axis dynamic."""
    ports = [*model.inputs, *model.outputs]
    shapes = [port.get_partial_shape() for port in ports]
    return all(
        shape.rank.is_static
        and shape.rank.get_length() >= 1
        and shape[0].is_dynamic
        and all(dim.is_static for dim in shape[1:])
        for shape in shapes
    )


def openvino_engine(
    bundle: Bundle,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int = 0,
    static_batch: int = 0,
    streams: int = 1,
) -> OpenVinoEngine:
    """The openvino engine over a bundle's fp32 ONNX graph (its int8 graph at int8); also
    registered as the `openvino` entry point of `hornet.engines`, which `hornet verify`
    and the int8 export's verification run bundles with. `static_batch`, `streams`: see
    OpenVinoEngine."""
    if device != "cpu":
        raise EngineUnavailable(f"the openvino engine runs on the CPU, not {device}")
    try:
        entry = bundle.manifest.engine_for("onnx", "int8" if precision == "int8" else "fp32")
    except LookupError as exc:
        raise EngineUnavailable(str(exc)) from exc
    return OpenVinoEngine(
        bundle.file(entry.file),
        precision=precision,
        threads=threads,
        static_batch=static_batch,
        streams=streams,
    )


def registered_engine(name: str) -> Callable[..., InferenceEngine]:
    """The engine factory another package registered as `name` under `hornet.engines`."""
    found = metadata.entry_points(group=ENGINE_ENTRY_POINTS, name=name)
    if not found:
        raise EngineUnavailable(
            f"engine {name!r} is not installed here: no {ENGINE_ENTRY_POINTS!r} entry point "
            f"named {name!r} (the torch engine comes with pip install 'hornet-serve[export]')"
        )
    (entry_point, *_) = found
    try:
        return entry_point.load()
    except ImportError as exc:
        raise EngineUnavailable(f"the {name} engine cannot be loaded: {exc}") from exc


def unverified_precision(bundle: Bundle, settings: Settings) -> str | None:
    """Why `bundle` may not be served at the settings' precision (one sentence naming the
    bundle, the precision and how to verify it), or None when its manifest verified it."""
    precision = settings.precision or "fp32"
    if settings.engine == "torch" or precision in bundle.manifest.verified_precisions():
        return None
    return (
        f"bundle {bundle.name!r} ({bundle.path}) has no passed parity record for {precision}: "
        f"{_how_to_verify(bundle, precision)}, or pass --allow-unverified-precision to serve "
        "it unverified"
    )


def verified_elsewhere(bundle: Bundle, settings: Settings) -> str | None:
    """One sentence when the bundle's passed records for the settings' precision name the
    CPUs they ran on and this CPU is none of them (bf16's and int8's figures depend on
    the CPU's arithmetic: AMX and AVX512_BF16 kernels, VNNI or not), else None: the
    server warns and serves, as the precision did pass on a CPU of its kind."""
    precision = settings.precision or "fp32"
    records = [p for p in bundle.manifest.parity if p.passed and p.precision == precision]
    cpus = {cpu for cpu in (runtime_cpu(p.runtime) for p in records) if cpu}
    here = cpu_model()
    if not cpus or here in cpus:
        return None
    return (
        f"bundle {bundle.name!r} was verified at {precision} on {', '.join(sorted(cpus))}, "
        f"not on this CPU ({here}), whose arithmetic may round differently: "
        f"{_how_to_verify(bundle, precision)}"
    )


def _how_to_verify(bundle: Bundle, precision: str) -> str:
    return {
        "bf16": f"verify it on this machine with `hornet verify {bundle.path} --precision bf16`",
        "int8": "export it again with `hornet export ... --int8 --calibration DIR`, which "
        "verifies the int8 graph",
    }.get(
        precision, "export it again with `hornet export ... --fp16`, which verifies the fp16 graph"
    )


def create_engine(bundle: Bundle, settings: Settings) -> InferenceEngine:
    """An engine instance for a bundle, as the settings ask (engine, device, precision).
    With --share-weights an OpenVINO engine is compiled for all --instances (as streams),
    which its `sibling()`s then run on (ModelPool)."""
    manifest = bundle.manifest
    try:
        if settings.engine == "tensorrt":
            entry = manifest.engine_for("tensorrt", settings.precision)
            return TensorRTEngine(bundle.file(entry.file), entry)
        if settings.engine == "openvino":
            return openvino_engine(
                bundle,
                settings.device,
                settings.precision or "fp32",
                settings.engine_thread_count,
                settings.max_batch_size if settings.openvino_static_shapes else 0,
                settings.instances if settings.share_weights else 1,
            )
        if settings.engine != "onnxruntime":
            return registered_engine(settings.engine)(bundle, device=settings.device)
        entry = manifest.engine_for("onnx", settings.precision)
    except LookupError as exc:
        raise EngineUnavailable(str(exc)) from exc
    static = cuda_static_shapes(settings)
    return OnnxRuntimeEngine(
        bundle.file(entry.file),
        device=settings.device,
        tensorrt_ep=settings.ort_tensorrt,
        precision=entry.precision,
        threads=settings.engine_thread_count,
        spinning=settings.engine_spinning,
        cache_dir=Path(tempfile.gettempdir()) / "hornet-trt-cache" / manifest.name,
        tf32=settings.cuda_tf32,
        static_batch=settings.max_batch_size if static else 0,
        shape_sessions=settings.cuda_shape_sessions if static else 0,
        conv_algo_search=settings.cuda_conv_algo_search,
    )


def sibling_of(engine: InferenceEngine, settings: Settings) -> InferenceEngine | None:
    """Another instance sharing `engine`'s weights, where --share-weights and the engine
    offers one (the optional `sibling()` of hornet_bundle.InferenceEngine); else None,
    and the caller makes another engine."""
    sibling = getattr(engine, "sibling", None) if settings.share_weights else None
    return sibling() if sibling is not None else None


def instances_of(
    bundle: Bundle,
    settings: Settings,
    factory: Callable[[Bundle, Settings], InferenceEngine] = create_engine,
) -> Iterator[tuple[InferenceEngine, bool]]:
    """The --instances engines of a bundle, one at a time (a caller may stop between
    them), as the server makes them: the first by `factory`, each other a sibling of it
    (`sibling_of`) or, where there is none, made again; with each, whether it holds a
    copy of the weights of its own."""
    first: InferenceEngine | None = None
    for _ in range(settings.instances):
        sibling = sibling_of(first, settings) if first is not None else None
        engine = sibling or factory(bundle, settings)
        first = first or engine
        yield engine, sibling is None


def cuda_static_shapes(settings: Settings) -> bool:
    """Whether ONNX Runtime engines run one static-batch session per size (see
    OnnxRuntimeEngine): on CUDA with --cuda-static-shapes, not through the TensorRT
    execution provider (which builds its own engines per shape)."""
    return (
        settings.engine == "onnxruntime"
        and settings.device == "cuda"
        and settings.cuda_static_shapes
        and not settings.ort_tensorrt
    )
