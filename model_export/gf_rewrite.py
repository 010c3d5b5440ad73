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
- "dense_dft": the 2-D real DFT as one MatMul over the flattened map and the filter
  folded into a second one: (H W)(6 H (W/2+1)) multiply-adds per channel, but two
  large GEMMs shared by all channels; fastest on small maps.
- "auto": dense_dft up to 64 pixels (7x7 at 224), matmul above.
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

GF_MODES = ("auto", "matmul", "dense_dft", "circular_conv")
# "auto": measured per feature size with bench/gf_modes.py (ONNX Runtime, 2-core CPU):
# the one-GEMM dense DFT wins on small maps (7x7, 0.26 vs 0.47 ms for 960 channels at
# batch 1), the separable form on larger ones (14x14: 1.1 vs 2.4 ms; 24x24: 17 vs 47 ms).
DENSE_DFT_MAX_PIXELS = 64


def auto_mode(size: tuple[int, int]) -> str:
    return "dense_dft" if size[0] * size[1] <= DENSE_DFT_MAX_PIXELS else "matmul"


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

    def _register_matrices(self, tensors: dict[str, np.ndarray]) -> None:
        """float32 non-persistent buffers, with exact zeros where cos/sin vanish
        (sin(pi) = 1.2e-16 would be an fp16 subnormal)."""
        for key, value in tensors.items():
            value = np.where(np.abs(value) < 1e-12, 0.0, value)
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(value)).float(),
                                 persistent=False)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(
                f"this DFT-free Global Filter was built for {self.size} feature maps, got "
                f"{tuple(x.shape[-2:])}; export again for this input size"
            )


class MatMulGlobalBranch(_FixedSize):
    """The real 2-D DFT, the filter and the inverse as MatMuls on real tensors.

    rfft along W: x @ F_w, whose columns interleave cos and -sin, so each row holds
    (real, imag) pairs; transposed and reshaped (free), row k of a channel is the k-th
    frequency column [A_r | A_i] (length 2H), and the complex fft along H is one real
    right-multiply by R = [[C, -S], [S, C]]. The complex product with the filter is
    z * [G_r | G_r] + z' * [-G_i | G_i], where z' = [Z_i | Z_r] comes from a second
    MatMul with R's column halves swapped (no slicing). The inverse fft along H is
    R_inv = [[C, S], [-S, C]], and the c2r along W a MatMul whose rows interleave the
    weighted cos and -sin (weights 1 for the DC and Nyquist bins, 2 for the rest, so the
    imaginary parts of those bins drop out exactly as irfft drops them). All matrices
    carry the "ortho" scaling. Every MatMul multiplies on the right by one shared matrix
    (one large GEMM in ONNX Runtime), and the graph has no Slice, Split or Concat.
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
        forward_w = np.stack([cos_w, -sin_w], axis=2).reshape(width, 2 * bins)  # (W, 2K)
        inverse_w = np.stack([weight[:, None] * cos_w.T, -weight[:, None] * sin_w.T],
                             axis=1).reshape(2 * bins, width)  # (2K, W)
        rotate = np.block([[cos_h, -sin_h], [sin_h, cos_h]])  # (2H, 2H), C and S symmetric
        rotate_swapped = np.concatenate([rotate[:, height:], rotate[:, :height]], axis=1)
        inverse_h = np.block([[cos_h, sin_h], [-sin_h, cos_h]])
        g_real = spectrum.real.transpose(0, 2, 1)  # (C, K, H)
        g_imag = spectrum.imag.transpose(0, 2, 1)
        tensors = {
            "forward_w": forward_w, "inverse_w": inverse_w, "forward_h": rotate,
            "forward_h_swapped": rotate_swapped, "inverse_h": inverse_h,
            "filter_same": np.concatenate([g_real, g_real], axis=2),  # (C, K, 2H)
            "filter_swapped": np.concatenate([-g_imag, g_imag], axis=2),
        }
        self._register_matrices(tensors)
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        height, bins = self.size[0], self.bins
        dtype = x.dtype
        channels = x.shape[1]
        a = torch.matmul(x, self.forward_w.to(dtype))  # (B, C, H, 2K): (re, im) pairs
        v = a.transpose(-1, -2).reshape(-1, channels, bins, 2 * height)  # [A_r | A_i]
        z = torch.matmul(v, self.forward_h.to(dtype))  # [Z_r | Z_i]
        z_swapped = torch.matmul(v, self.forward_h_swapped.to(dtype))  # [Z_i | Z_r]
        y = z * self.filter_same.to(dtype) + z_swapped * self.filter_swapped.to(dtype)
        u = torch.matmul(y, self.inverse_h.to(dtype))  # [U_r | U_i]
        u = u.reshape(-1, channels, 2 * bins, height).transpose(-1, -2)  # (B, C, H, 2K)
        return torch.matmul(u, self.inverse_w.to(dtype))


class DenseDFTGlobalBranch(_FixedSize):
    """The 2-D real DFT as one MatMul over the flattened map, the filter, and the inverse
    as a second MatMul: two large GEMMs shared by all channels (no per-channel matrices).

    S = x @ F gives [Re | Im] of the half spectrum; the complex product with the filter
    folds into the inverse: y = [S * [g_r | g_r], S * [g_i | g_i]] @ [[I_r; I_i]; [I_i; -I_r]],
    where I_r, I_i carry c2r's column weights (1 for DC and Nyquist, else 2).
    """

    def __init__(self, spectrum: np.ndarray, size: tuple[int, int]) -> None:
        super().__init__(size)
        height, width = size
        bins = width // 2 + 1
        h, w = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        kh, kw = np.meshgrid(np.arange(height), np.arange(bins), indexing="ij")
        theta = 2 * np.pi * (np.outer(h.ravel(), kh.ravel()) / height + np.outer(w.ravel(), kw.ravel()) / width)
        norm = 1.0 / np.sqrt(height * width)
        forward = np.concatenate([np.cos(theta), -np.sin(theta)], axis=1) * norm  # (HW, 2N)
        weight = np.where((kw.ravel() == 0) | ((width % 2 == 0) & (kw.ravel() == width // 2)), 1.0, 2.0)
        inv_real = (weight[:, None] * np.cos(theta.T)) * norm  # (N, HW)
        inv_imag = -(weight[:, None] * np.sin(theta.T)) * norm
        inverse = np.concatenate([inv_real, inv_imag, inv_imag, -inv_real], axis=0)  # (4N, HW)
        g_real = spectrum.real.reshape(spectrum.shape[0], -1)
        g_imag = spectrum.imag.reshape(spectrum.shape[0], -1)
        tensors = {
            "dft": forward, "inverse": inverse,
            "filter_real": np.concatenate([g_real, g_real], axis=1),
            "filter_imag": np.concatenate([g_imag, g_imag], axis=1),
        }
        self._register_matrices(tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        batch, channels, height, width = x.shape
        s = torch.matmul(x.reshape(batch, channels, height * width), self.dft.to(x.dtype))
        mixed = torch.cat([s * self.filter_real.to(x.dtype), s * self.filter_imag.to(x.dtype)], dim=-1)
        return torch.matmul(mixed, self.inverse.to(x.dtype)).reshape(batch, channels, height, width)


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


_SPECTRUM_BRANCHES = {"matmul": MatMulGlobalBranch, "dense_dft": DenseDFTGlobalBranch}


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
    model: nn.Module, mode: str = "auto", example_input: object = None
) -> nn.Module:
    """Give every Global Filter of `model` a DFT-free global branch, in place.

    Feature sizes are found by one forward pass on `example_input` (default: zeros at
    the model's pretrained_cfg input size). A layer the pass does not reach is an error.
    Returns the model; `undo_rewrite` restores the FFT path.
    """
    if mode not in GF_MODES:
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
        chosen = auto_mode(sizes[layer]) if mode == "auto" else mode
        if chosen == "circular_conv":
            branch = CircularConvGlobalBranch(global_kernels(layer, sizes[layer]))
        else:
            branch = _SPECTRUM_BRANCHES[chosen](global_spectrum(layer, sizes[layer]), sizes[layer])
        layer.fixed_branch = branch.to(param.device)
    return model


def undo_rewrite(model: nn.Module) -> nn.Module:
    for layer in global_filter_layers(model):
        layer.fixed_branch = None
    return model
