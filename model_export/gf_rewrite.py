"""DFT-free Global Filters for export.

For one fixed feature size (H, W) the GF layer's global branch,
`irfft2(rfft2(x, ortho) * W_c, s=(H, W), ortho)` per channel c, is linear and shift
invariant (c2r ignores the imaginary part of the DC and Nyquist columns, which keeps it
so), hence a circular convolution with the real kernel

    g_c = irfft2(W_c / sqrt(H * W), s=(H, W), norm="ortho")

(its response to a unit impulse at the origin). Exactly equivalent graphs follow:

- "matmul": the real DFT written as MatMuls with fixed cos/sin matrices (separable:
  along W, then H), the complex product with the filter, and the inverse the same way;
  O(H W (H + W)) multiply-adds per channel, no weights beyond the filter itself, and
  no data movement of its own (see MatMulGlobalBranch).
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

from model_export.gf_mode import REWRITE_MODES, GFMode
from model_export.gnconv import GlobalLocalFilter, resize_complex_filter

# "auto": measured per feature size with bench/gf_modes.py (ONNX Runtime, 2-core CPU,
# one GF branch, batch 1/8): the one-GEMM dense DFT wins on small maps (7x7, 496
# channels: 0.10/0.60 ms vs 0.20/1.14 for matmul), the separable form on larger ones
# (12x12: 0.33/2.4 vs 0.51/4.0; 14x14, 240 channels: 0.24/1.6 vs 0.50/3.4; 24x24:
# 0.62/4.6 vs 3.5/26); circular_conv is never the fastest.
DENSE_DFT_MAX_PIXELS = 64


def auto_mode(size: tuple[int, int]) -> GFMode:
    return GFMode.DENSE_DFT if size[0] * size[1] <= DENSE_DFT_MAX_PIXELS else GFMode.MATMUL


def global_spectrum(layer: GlobalLocalFilter, size: tuple[int, int]) -> np.ndarray:
    """The (C, H, W//2+1) complex filter at `size`, resized exactly as the model does."""
    height, width = size
    weight = resize_complex_filter(
        layer.complex_weight.detach().float().cpu(), (height, width // 2 + 1)
    )
    return weight[..., 0].double().numpy() + 1j * weight[..., 1].double().numpy()


def global_kernels(layer: GlobalLocalFilter, size: tuple[int, int]) -> np.ndarray:
    """The (C, H, W) float64 spatial kernels of a GF layer's global branch at `size`."""
    return spectrum_kernels(global_spectrum(layer, size), size)


def spectrum_kernels(spectrum: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The circular-convolution kernels equal to filtering by a (C, H, W//2+1) spectrum."""
    height, width = size
    return np.fft.irfft2(
        spectrum / np.sqrt(height * width), s=(height, width), axes=(1, 2), norm="ortho"
    )


class _FixedSize(nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)

    def _register_matrices(self, tensors: dict[str, np.ndarray]) -> None:
        """float32 non-persistent buffers, with exact zeros where cos/sin vanish
        (sin(pi) = 1.2e-16 would be an fp16 subnormal)."""
        for key, value in tensors.items():
            value = np.where(np.abs(value) < 1e-12, 0.0, value)
            self.register_buffer(
                key, torch.from_numpy(np.ascontiguousarray(value)).float(), persistent=False
            )

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(
                f"this DFT-free Global Filter was built for {self.size} feature maps, got "
                f"{tuple(x.shape[-2:])}; export again for this input size"
            )


class MatMulGlobalBranch(_FixedSize):
    """The real 2-D DFT, the filter and the inverse as MatMuls on real tensors, laid out
    so that the graph needs no Transpose, Slice, Split or Concat of its own.

    With K = W//2 + 1 bins, C/S the (symmetric, "ortho"-scaled) cos/sin matrices along
    H, and A = A_r + i A_i the rfft of x along W:

    1. t = x @ F (F: W x 4K). Reshaped (free) to (2H, 2K), row (h, j) holds, for every
       bin k, the terms that the fft along H combines with C (j = 0) and with S (j = 1)
       to make Z_r = A_r C + A_i S and Z_i = A_i C - A_r S.
    2. z = t^T @ M (M: 2H x H, rows alternating C and S): the fft along H as one
       contraction over (h, j). The transpose feeds the MatMul directly, so ONNX Runtime
       fuses it into the GEMM (FusedMatMul) instead of copying: as a Transpose of the
       small maps between a Reshape and a MatMul it took 0.5 ms per layer at batch 1 on
       2 threads, more than all the layer's GEMMs. Row k of z, reshaped (free), is
       [Z_r | Z_i].
    3. p = z * [[G_r | G_i], [G_i | G_r]], broadcast over a new axis of two and
       reshaped (free) to [Z_r G_r | Z_i G_i | Z_r G_i | Z_i G_r] per bin: the four
       products of the complex multiplication with the filter.
    4. u = p @ N (N: 4H x 2H): the sums Y_r = p0 - p1 and Y_i = p2 + p3, and the inverse
       fft along H, in one right-multiply, giving [U_r | U_i] per bin.
    5. out = u'^T @ I_w with u' the free reshape to rows (k, re/im): the c2r along W
       (weights 1 for the DC and Nyquist bins, 2 for the rest, so the imaginary parts of
       those bins drop out as irfft drops them), again with the transpose fused.
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
        # Step 1, columns (j, k, re/im) with A_r = x @ cos_w and A_i = -x @ sin_w:
        # j = 0 (times C): A_r for Z_r, A_i for Z_i; j = 1 (times S): A_i, -A_r.
        with_c = np.stack([cos_w, -sin_w], axis=2).reshape(width, 2 * bins)
        with_s = np.stack([-sin_w, -cos_w], axis=2).reshape(width, 2 * bins)
        forward_h = np.stack([cos_h, sin_h], axis=1).reshape(2 * height, height)
        inverse_h = np.vstack(
            [
                np.hstack([cos_h, sin_h]),
                -np.hstack([cos_h, sin_h]),
                np.hstack([-sin_h, cos_h]),
                np.hstack([-sin_h, cos_h]),
            ]
        )
        inverse_w = np.stack(
            [weight[:, None] * cos_w.T, -weight[:, None] * sin_w.T], axis=1
        ).reshape(2 * bins, width)  # rows (k, re/im)
        g_real = spectrum.real.transpose(0, 2, 1)  # (C, K, H)
        g_imag = spectrum.imag.transpose(0, 2, 1)
        tensors = {
            "forward_w": np.concatenate([with_c, with_s], axis=1),
            "forward_h": forward_h,
            "inverse_h": inverse_h,
            "inverse_w": inverse_w,
            "filter": np.stack(
                [
                    np.concatenate([g_real, g_imag], axis=2),
                    np.concatenate([g_imag, g_real], axis=2),
                ],
                axis=2,
            ),  # (C, K, 2, 2H)
        }
        self._register_matrices(tensors)
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        height, bins = self.size[0], self.bins
        dtype = x.dtype
        channels = x.shape[1]
        t = torch.matmul(x, self.forward_w.to(dtype)).reshape(-1, channels, 2 * height, 2 * bins)
        z = torch.matmul(t.transpose(-1, -2), self.forward_h.to(dtype))  # (B, C, 2K, H)
        p = z.reshape(-1, channels, bins, 1, 2 * height) * self.filter.to(dtype)
        u = torch.matmul(p.reshape(-1, channels, bins, 4 * height), self.inverse_h.to(dtype))
        u = u.reshape(-1, channels, 2 * bins, height)  # rows (k, re/im)
        return torch.matmul(u.transpose(-1, -2), self.inverse_w.to(dtype))


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
        theta = (
            2
            * np.pi
            * (np.outer(h.ravel(), kh.ravel()) / height + np.outer(w.ravel(), kw.ravel()) / width)
        )
        norm = 1.0 / np.sqrt(height * width)
        forward = np.concatenate([np.cos(theta), -np.sin(theta)], axis=1) * norm  # (HW, 2N)
        weight = np.where(
            (kw.ravel() == 0) | ((width % 2 == 0) & (kw.ravel() == width // 2)), 1.0, 2.0
        )
        inv_real = (weight[:, None] * np.cos(theta.T)) * norm  # (N, HW)
        inv_imag = -(weight[:, None] * np.sin(theta.T)) * norm
        inverse = np.concatenate([inv_real, inv_imag, inv_imag, -inv_real], axis=0)  # (4N, HW)
        g_real = spectrum.real.reshape(spectrum.shape[0], -1)
        g_imag = spectrum.imag.reshape(spectrum.shape[0], -1)
        tensors = {
            "dft": forward,
            "inverse": inverse,
            "filter_real": np.concatenate([g_real, g_real], axis=1),
            "filter_imag": np.concatenate([g_imag, g_imag], axis=1),
        }
        self._register_matrices(tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        batch, channels, height, width = x.shape
        s = torch.matmul(x.reshape(batch, channels, height * width), self.dft.to(x.dtype))
        mixed = torch.cat(
            [s * self.filter_real.to(x.dtype), s * self.filter_imag.to(x.dtype)], dim=-1
        )
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
        # The wrap-pad as slices and concatenations: ONNX's Pad mode "wrap" does not
        # import into OpenVINO.
        padded = torch.cat((x[:, :, 1:], x), dim=2)
        padded = torch.cat((padded[:, :, :, 1:], padded), dim=3)
        return F.conv2d(padded, self.weight.to(x.dtype), groups=x.shape[1])


_SPECTRUM_BRANCHES = {GFMode.MATMUL: MatMulGlobalBranch, GFMode.DENSE_DFT: DenseDFTGlobalBranch}


def global_filter_layers(model: nn.Module) -> list[GlobalLocalFilter]:
    return [m for m in model.modules() if isinstance(m, GlobalLocalFilter)]


def feature_sizes(
    model: nn.Module, example_input: object
) -> dict[GlobalLocalFilter, tuple[int, int]]:
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
        raise ValueError(
            "model has no pretrained_cfg: pass example_input to rewrite_global_filters"
        )
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
    if mode not in REWRITE_MODES:
        choices = tuple(m.value for m in REWRITE_MODES)
        raise ValueError(f"unknown gf mode {mode!r}; choose one of {choices}")
    layers = global_filter_layers(model)
    if not layers:
        return model
    undo_rewrite(model)
    sizes = feature_sizes(
        model, _default_example(model) if example_input is None else example_input
    )
    unreached = [layer for layer in layers if layer not in sizes]
    if unreached:
        raise ValueError(
            f"{len(unreached)} Global Filter layers were not reached by the example input"
        )
    param = next(model.parameters())
    for layer in layers:
        chosen = auto_mode(sizes[layer]) if mode == GFMode.AUTO else GFMode(mode)
        if chosen == GFMode.CIRCULAR_CONV:
            branch = CircularConvGlobalBranch(global_kernels(layer, sizes[layer]))
        else:
            branch = _SPECTRUM_BRANCHES[chosen](global_spectrum(layer, sizes[layer]), sizes[layer])
        layer.fixed_branch = branch.to(param.device)
    return model


def undo_rewrite(model: nn.Module) -> nn.Module:
    for layer in global_filter_layers(model):
        layer.fixed_branch = None
    return model
