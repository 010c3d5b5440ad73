from __future__ import annotations

import pytest
import torch

# Tiny HorNet: every code path of the full network (all four stages, gnConv orders 2-5,
# GF in stages 3-4) at a fraction of the cost. base_dim 32 keeps 8C divisible by 2^4.
TINY = dict(base_dim=32, depths=(1, 1, 2, 1))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter trained-like, non-trivial values.

    Layer scales around 0.3 (not the 1e-6 of initialisation, which would hide every
    block), GF filters of order 1, norms near 1, other weights small and random.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("gamma1", "gamma2")):
                p.copy_(0.3 + 0.05 * noise)
            elif name.endswith("complex_weight"):
                p.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else 16
                p.copy_(noise / fan_in**0.5)
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
