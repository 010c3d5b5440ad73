from __future__ import annotations

import torch
from torch import nn

# Tiny HorNet for the dense models: all four stages, gnConv orders 2-5, GF in stages 3-4,
# at a fraction of the cost. base_dim 16 keeps 8C = 128 divisible by 2^4.
TINY = dict(base_dim=16, depths=(1, 1, 1, 1))
TINY_SEG = TINY | dict(channels=32)
TINY_DET = TINY | dict(fpn_channels=32, min_size=160, max_size=224)


def randomize_(model: nn.Module, seed: int = 0, gamma: float = 0.3) -> nn.Module:
    """Trained-like, non-trivial values everywhere: layer scales ~0.3 (not 1e-6), GF
    filters of order 1, norms near 1, BatchNorm statistics away from (0, 1).
    A smaller `gamma` keeps deep random stacks from amplifying float rounding."""
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
                p.copy_(noise / fan_in**0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=gen))
                module.running_var.copy_(1.0 + 0.2 * torch.rand(shape, generator=gen))
    return model
