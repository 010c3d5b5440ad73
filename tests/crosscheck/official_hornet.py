"""Our HorNet backbone under the official configs' arguments, for the mmdet and mmseg
reference scripts (each registers it as `HorNet` in its own registry). Runs in the
OpenMMLab environment; needs only model_export."""

from __future__ import annotations

import re

from model_export.hornet import HorNetFeatures, gf_filter_sizes

# The official configs' gnconv entries: `partial(gnconv, order=N, s=1/3)` for 7x7 stages,
# with `h=, w=, gflayer=GlobalLocalFilter` for Global Filter ones.
GNCONV = re.compile(
    r"partial\(gnconv, order=(\d), s=1/3(?:, h=(\d+), w=(\d+), gflayer=GlobalLocalFilter)?\)"
)


class OfficialHorNet(HorNetFeatures):
    """HorNetFeatures built from the official backbone config (depths, base_dim, the
    gnconv strings); anything we do not build is refused."""

    def __init__(
        self,
        depths,
        base_dim,
        gnconv,
        block="Block",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0,
        pretrained=None,
        init_cfg=None,
    ):
        if block != "Block" or list(out_indices) != [0, 1, 2, 3]:
            raise ValueError(f"unsupported block {block!r} or out_indices {out_indices}")
        stages = [GNCONV.fullmatch(spec) for spec in gnconv]
        if not all(stages):
            raise ValueError(f"unsupported gnconv specs: {gnconv}")
        gf_sizes = [(int(m.group(2)), int(m.group(3))) for m in stages if m.group(2)]
        image_size = 16 * gf_sizes[0][0] if gf_sizes else 224
        if gf_sizes and tuple(gf_sizes) != gf_filter_sizes(image_size):
            raise ValueError(f"GF sizes {gf_sizes} are not those of one square input size")
        super().__init__(
            base_dim=base_dim,
            depths=depths,
            orders=[int(m.group(1)) for m in stages],
            gf=bool(gf_sizes),
            image_size=image_size,
        )

    def init_weights(self):
        """The weights come from the reference scripts' seeded fill."""

    def forward(self, x):
        return tuple(super().forward(x))
