"""Triton's own HTTP client (tritonclient from PyPI) against a real `python -m service`
process: health, metadata, config, and binary-data inference equal to /classify's."""

from __future__ import annotations

import numpy as np
import pytest

from service.testing import running_server
from tests.helpers.images import encode, upload
from tests.helpers.references import crop_of, official_probabilities, scores_by_index

httpclient = pytest.importorskip("tritonclient.http")

NAMES = ("chelsea", "astronaut", "portrait")


@pytest.fixture(scope="module")
def triton(classifier_dir, tmp_path_factory):
    """A real `python -m service` (uvicorn) and a tritonclient HTTP client to it."""
    log_path = tmp_path_factory.mktemp("v2_server") / "server.log"
    flags = ["--model-dir", str(classifier_dir), "--max-batch-size", "4", "--engine-threads", "1"]
    with running_server([*flags, "--max-delay-ms", "5"], log_path=log_path) as server:
        base_url = server.url
        client = httpclient.InferenceServerClient(
            base_url.removeprefix("http://"), network_timeout=30
        )
        try:
            yield client, base_url
        finally:
            client.close()


def classify_scores(base_url: str, images: list[bytes]) -> np.ndarray:
    import httpx

    response = httpx.post(
        f"{base_url}/classify", params={"top_k": 10}, files=upload(*images), timeout=30
    )
    assert response.status_code == 200, response.text
    return np.array(
        [[scores_by_index(r)[i] for i in range(10)] for r in response.json()["results"]]
    )


def test_tritonclient_sees_a_live_ready_server_and_its_model(triton) -> None:
    client, _ = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny_cls")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("tiny_cls")
    config = client.get_model_config("tiny_cls")
    assert [i["name"] for i in metadata["inputs"]] == ["image", "encoded_image"]
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == [224, 224, 3]


def test_tritonclient_binary_image_tensor_equals_classify(triton, photos) -> None:
    client, base_url = triton
    crops = np.stack([crop_of(photos[n]) for n in NAMES])
    image = httpclient.InferInput("image", list(crops.shape), "UINT8")
    image.set_data_from_numpy(crops, binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput("logits", binary_data=True),
        httpclient.InferRequestedOutput("probabilities", binary_data=True),
    ]
    result = client.infer("tiny_cls", [image], outputs=outputs)
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    expected = classify_scores(base_url, [encode(photos[n]) for n in NAMES])
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(_softmax(logits), expected, atol=1e-6)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    for row, name in enumerate(NAMES):
        np.testing.assert_allclose(
            probabilities[row], official_probabilities(photos[name]), rtol=1e-4, atol=1e-7
        )


def test_tritonclient_binary_encoded_images_equal_classify(triton, photos) -> None:
    client, base_url = triton
    images = [encode(photos[n], "JPEG", quality=85) for n in NAMES]
    encoded = httpclient.InferInput("encoded_image", [len(images), 1], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1), binary_data=True)
    result = client.infer("tiny_cls", [encoded])  # no outputs named: all, as binary
    expected = classify_scores(base_url, images)
    np.testing.assert_allclose(_softmax(result.as_numpy("logits")), expected, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)


def test_tritonclient_classification_output_and_errors(triton, photos) -> None:
    client, _ = triton
    crop = crop_of(photos["coffee"])[None]
    image = httpclient.InferInput("image", list(crop.shape), "UINT8")
    image.set_data_from_numpy(crop, binary_data=False)
    top = httpclient.InferRequestedOutput("probabilities", class_count=2)
    (best, second) = client.infer("tiny_cls", [image], outputs=[top]).as_numpy("probabilities")[0]
    expected = np.argsort(-official_probabilities(photos["coffee"]), kind="stable")[:2]
    assert [int(e.split(b":")[1]) for e in (best, second)] == list(expected)
    wrong = httpclient.InferInput("image", [1, 8, 8, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(Exception, match=r"224, 224, 3"):
        client.infer("tiny_cls", [wrong])
    with pytest.raises(Exception, match="no model named"):
        client.get_model_metadata("nope")


def _softmax(logits: np.ndarray) -> np.ndarray:
    from service.pipelines import softmax

    return softmax(logits)
