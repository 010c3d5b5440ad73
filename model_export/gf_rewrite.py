"""DFT-free Global Filters for export.

For one fixed feature size (H, W) the GF layer's global branch,
`irfft2(rfft2(x, ortho) * W_c, s=(H, W), ortho)` per channel c, is linear and shift
invariant (c2r ignores the imaginary part of the DC and Nyquist columns, which keeps it
so), hence a circular convolution with the real kernel

    g_c = irfft2(W_c / sqrt(H * W), s=(H, W), norm="ortho")

(its response to a unit impulse at the origin). Two exactly equivalent graphs follow:

- "matmul": the real DFT written as MatMuls with fixed cos/sin matrices (separable:
  along W, then H), the complex product with the filter, and the inverse the same way;
  O(H W (H + W)) multiply-adds per channel and no weights beyond the filter itself.
- "circular_conv": wrap-pad by (H-1, W-1) on the top/left and run a depthwise H x W
  convolution with the flipped kernel (Pad mode "wrap" + Conv in ONNX).

Kernels are computed in float64 with numpy from the float32 filter (resized first,
exactly as the torch model does at run time), then stored as float32 buffers that are
not persistent: state dicts, and so checkpoints, are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_export.gnconv import GlobalLocalFilter, resize_complex_filter

GF_MODES = ("matmul", "circular_conv")


def global_spectrum(layer: GlobalLocalFilter, size: tuple[int, int]) -> np.ndarray:
    """The (C, H, W//2+1) complex filter at `size`, resized exactly as the model does."""
    height, width = size
    weight = resize_complex_filter(layer.complex_weight.detach().float().cpu(), (height, width // 2 + 1))
    return weight[..., 0].double().numpy() + 1j * weight[..., 1].double().numpy()


def global_kernels(layer: GlobalLocalFilter, size: tuple[int, int]) -> np.ndarray:
    """The (C, H, W) float64 spatial kernels of a GF layer's global branch at `size`."""
    height, width = size
    spectrum = global_spectrum(layer, size)
    return np.fft.irfft2(spectrum / np.sqrt(height * width), s=(height, width), axes=(1, 2), norm="ortho")


class _FixedSize(nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(
                f"this DFT-free Global Filter was built for {self.size} feature maps, got "
                f"{tuple(x.shape[-2:])}; export again for this input size"
            )


class MatMulGlobalBranch(_FixedSize):
    """The real 2-D DFT, the filter and the inverse as MatMuls on real tensors.

    rfft along W: x @ [C_w | -S_w]; fft along H: [C_h; S_h] @ (.); complex product
    with the filter; inverse fft along H; c2r along W, whose weights (1 for the DC and
    Nyquist columns, 2 for the rest) make the imaginary parts of those columns drop
    out exactly as irfft does. All matrices carry the "ortho" scaling.
    """

    def __init__(self, spectrum: np.ndarray, size: tuple[int, int]) -> None:
        super().__init__(size)
        height, width = size
        bins = width // 2 + 1
        h = np.arange(height)
        angle_h = 2 * np.pi * np.outer(h, h) / height
        cos_h, sin_h = np.cos(angle_h) / np.sqrt(height), np.sin(angle_h) / np.sqrt(height)
        angle_w = 2 * np.pi * np.outer(np.arange(width), np.arange(bins)) / width
        cos_w, sin_w = np.cos(angle_w) / np.sqrt(width), np.sin(angle_w) / np.sqrt(width)
        weight = np.full(bins, 2.0)
        weight[0] = 1.0
        if width % 2 == 0:
            weight[-1] = 1.0
        forward_w = np.concatenate([cos_w, -sin_w], axis=1)  # (W, 2K): [real | imag]
        forward_h = np.concatenate([cos_h, sin_h], axis=0)  # (2H, H)
        inverse_h = np.concatenate([cos_h.T, sin_h.T], axis=0)  # (2H, H), e^{+i}
        inverse_w = np.concatenate([weight[:, None] * cos_w.T, -weight[:, None] * sin_w.T], axis=0)
        tensors = {
            "forward_w": forward_w, "forward_h": forward_h, "inverse_h": inverse_h,
            "inverse_w": inverse_w, "filter_real": spectrum.real, "filter_imag": spectrum.imag,
        }
        for key, value in tensors.items():
            # exact zeros where cos/sin vanish (sin(pi) = 1.2e-16 would be an fp16 subnormal)
            value = np.where(np.abs(value) < 1e-12, 0.0, value)
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(value)).float(), persistent=False)
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        height, bins = self.size[0], self.bins
        a = torch.matmul(x, self.forward_w.to(x.dtype))  # (B, C, H, 2K)
        p = torch.matmul(self.forward_h.to(x.dtype), a)  # (B, C, 2H, 2K): [C_h A; S_h A]
        ch, sh = p[:, :, :height], p[:, :, height:]
        z_real = ch[..., :bins] + sh[..., bins:]
        z_imag = ch[..., bins:] - sh[..., :bins]
        g_real, g_imag = self.filter_real.to(x.dtype), self.filter_imag.to(x.dtype)
        y_real = z_real * g_real - z_imag * g_imag
        y_imag = z_real * g_imag + z_imag * g_real
        # inverse along H: U = (C_h^T - i S_h^T)^* ... = C_h^T Y + i S_h^T Y
        q = torch.matmul(self.inverse_h.to(x.dtype), torch.cat([y_real, y_imag], dim=-1))
        cq, sq = q[:, :, :height], q[:, :, height:]
        u_real = cq[..., :bins] - sq[..., bins:]
        u_imag = cq[..., bins:] + sq[..., :bins]
        return torch.matmul(torch.cat([u_real, u_imag], dim=-1), self.inverse_w.to(x.dtype))


class CircularConvGlobalBranch(_FixedSize):
    """Wrap-pad (H-1, W-1) on the top/left, depthwise conv with the flipped kernel."""

    def __init__(self, kernels: np.ndarray) -> None:
        channels, height, width = kernels.shape
        super().__init__((height, width))
        weight = np.ascontiguousarray(kernels[:, ::-1, ::-1])[:, None]
        self.register_buffer("weight", torch.from_numpy(weight).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        height, width = self.size
        padded = F.pad(x, (width - 1, 0, height - 1, 0), mode="circular")
        return F.conv2d(padded, self.weight.to(x.dtype), groups=x.shape[1])


_BRANCHES = {"matmul": MatMulGlobalBranch, "circular_conv": CircularConvGlobalBranch}


def global_filter_layers(model: nn.Module) -> list[GlobalLocalFilter]:
    return [m for m in model.modules() if isinstance(m, GlobalLocalFilter)]


def feature_sizes(model: nn.Module, example_input: object) -> dict[GlobalLocalFilter, tuple[int, int]]:
    """Run the model once and record the feature size each GF layer sees."""
    sizes: dict[GlobalLocalFilter, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, tuple(args[0].shape[-2:]))

    hooks = [layer.register_forward_pre_hook(record) for layer in global_filter_layers(model)]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _default_example(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        raise ValueError("model has no pretrained_cfg: pass example_input to rewrite_global_filters")
    param = next(model.parameters())
    return torch.zeros(1, *cfg.input_size, dtype=param.dtype, device=param.device)


def rewrite_global_filters(
    model: nn.Module, mode: str = "matmul", example_input: object = None
) -> nn.Module:
    """Give every Global Filter of `model` a DFT-free global branch, in place.

    Feature sizes are found by one forward pass on `example_input` (default: zeros at
    the model's pretrained_cfg input size). A layer the pass does not reach is an error.
    Returns the model; `undo_rewrite` restores the FFT path.
    """
    if mode not in _BRANCHES:
        raise ValueError(f"unknown gf mode {mode!r}; choose one of {GF_MODES}")
    layers = global_filter_layers(model)
    if not layers:
        return model
    undo_rewrite(model)
    sizes = feature_sizes(model, _default_example(model) if example_input is None else example_input)
    unreached = [layer for layer in layers if layer not in sizes]
    if unreached:
        raise ValueError(f"{len(unreached)} Global Filter layers were not reached by the example input")
    param = next(model.parameters())
    for layer in layers:
        if mode == "matmul":
            branch = MatMulGlobalBranch(global_spectrum(layer, sizes[layer]), sizes[layer])
        else:
            branch = CircularConvGlobalBranch(global_kernels(layer, sizes[layer]))
        layer.fixed_branch = branch.to(param.device)
    return model


def undo_rewrite(model: nn.Module) -> nn.Module:
    for layer in global_filter_layers(model):
        layer.fixed_branch = None
    return model
