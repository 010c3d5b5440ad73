from __future__ import annotations

import torch
from torch import nn

# Tiny HorNet for the dense models: all four stages, gnConv orders 2-5, GF in stages 3-4,
# at a fraction of the cost. base_dim 16 keeps 8C = 128 divisible by 2^4.
TINY = dict(base_dim=16, depths=(1, 1, 1, 1))
TINY_SEG = TINY | dict(channels=32)
TINY_DET = TINY | dict(fpn_channels=32, min_size=160, max_size=224)


def randomize_(
    model: nn.Module, seed: int = 0, gamma: float = 0.3, fc_cls_scale: float = 1.0
) -> nn.Module:
    """Trained-like, non-trivial values everywhere: layer scales ~0.3 (not 1e-6), GF
    filters of order 1, norms near 1, BatchNorm statistics away from (0, 1), other
    weights ~ 1/sqrt(fan-in), a detector's class weights (`fc_cls`) `fc_cls_scale` times
    that. A smaller `gamma` keeps deep random stacks from amplifying float rounding.

    The one recipe of the tests, the mmdet/mmseg references (run in .venv-mm) and the
    benchmarks: seeded alike, they write the same weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("gamma1", "gamma2")):
                p.copy_(gamma * (1.0 + 0.15 * noise))
            elif name.endswith("complex_weight"):
                p.copy_(noise)
            elif ("norm" in name or ".bn." in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else 16
                scale = fc_cls_scale if ".fc_cls." in name else 1.0
                p.copy_(scale * noise / fan_in**0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=gen))
                module.running_var.copy_(1.0 + 0.2 * torch.rand(shape, generator=gen))
    return model


# The released detectors' architecture (mmdet layout) at tiny widths.
TINY_MMDET = dict(base_dim=16, depths=(1, 1, 1, 1), fpn_channels=32, fc_channels=64)


def tiny_mmdet_detector(
    name: str = "cascade_mask_rcnn_hornet_tiny_7x7", background_bias: float | None = None
) -> nn.Module:
    """A tiny mmdet-layout detector with seeded, non-trivial weights whose class scores
    spread over (0.05, 1) as a trained detector's do (class weights x16, as the mmdet
    cross-check's), or stay under 0.05 everywhere with a large `background_bias`."""
    from model_export import create_model

    model = randomize_(create_model(name, **TINY_MMDET), seed=3, fc_cls_scale=16).eval()
    if background_bias is not None:
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "fc_cls"):
                    module.fc_cls.bias[-1] = background_bias
    return model


def export_tiny_mmdet_detector(out_dir, model: nn.Module | None = None):
    """`model` (default: tiny_mmdet_detector()) exported as the released detectors are
    (the graph takes the image fitted to (1333, 800) on the host and answers 28x28 masks
    the host pastes), checked against torch on one photograph (astronaut, fitted as the
    service fits it) instead of the default four: a quarter of the time."""
    from PIL import Image
    from skimage import data

    from hornet_bundle.preprocess import fit_image
    from model_export.export import ExportOptions, export
    from model_export.export.options import ParityImages

    fitted = fit_image(Image.fromarray(data.astronaut()), (1333, 800), "opencv")
    parity = ParityImages([torch.from_numpy(fitted)], "astronaut, fitted")
    return export(model or tiny_mmdet_detector(), out_dir, ExportOptions(parity_images=parity))
