"""Official-pipeline parity: a HorNet exported by `export` and served over HTTP
scores real photos as the torch model does on torchvision's evaluation transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "portrait"]


@pytest.fixture(scope="module")
def tiny_hornet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A small random HorNet with Global Filters, exported as a classifier bundle."""
    export = pytest.importorskip("model_export.export")
    from model_export import create_model

    torch.manual_seed(0)
    model = create_model("hornet_tiny_gf", base_dim=16, depths=(1, 1, 1, 1))
    out = tmp_path_factory.mktemp("bundles") / "tiny_hornet_gf"
    export.export(model, out, export.ExportOptions(name="tiny_hornet_gf"))
    return model, out


def torch_official_probabilities(model: torch.nn.Module, array: np.ndarray) -> np.ndarray:
    """timm's eval transform for a 224 model, done by torchvision, then the torch model."""
    cfg = model.pretrained_cfg
    official = transforms.Compose(
        [
            transforms.Resize(
                int(cfg.image_size / cfg.crop_pct),
                interpolation=transforms.InterpolationMode.BICUBIC,
            ),
            transforms.CenterCrop(cfg.image_size),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ]
    )
    with torch.inference_mode():
        logits = model.double()(official(Image.fromarray(array))[None].double())
    return torch.softmax(logits, dim=-1)[0].numpy()


async def test_served_scores_equal_the_official_torch_pipeline(tiny_hornet, photos) -> None:
    model, bundle = tiny_hornet
    classes = model.pretrained_cfg.num_classes
    async with serving([bundle], max_batch_size=8) as client:
        response = await client.post(
            "/classify",
            params={"top_k": classes},
            files=upload(*(encode(photos[name]) for name in PHOTOS)),
        )
    assert response.status_code == 200, response.text
    for name, result in zip(PHOTOS, response.json()["results"], strict=True):
        expected = torch_official_probabilities(model, photos[name])
        scores = {entry["index"]: entry["score"] for entry in result["top_k"]}
        served = np.array([scores[i] for i in range(classes)])
        np.testing.assert_allclose(served, expected, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(served, expected, rtol=1e-3, err_msg=name)
        assert result["top_k"][0]["index"] == int(expected.argmax())
