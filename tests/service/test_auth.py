"""API keys, off by default: real `python -m service` processes asked with and without
a key, over REST, the v2 protocol and Triton's own client; and the settings that hold
the keys without ever showing them."""

from __future__ import annotations

import hmac
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr, ValidationError

from service import cli
from service.auth import KeyRing, key_matches
from service.settings import Settings
from service.testing import running_server
from tests.helpers.images import encode, upload
from tests.helpers.raw_http import connect, parse_answer, read_one_answer, read_until_closed, send

httpclient = pytest.importorskip("tritonclient.http")

KEY = "hornet-test-key-1f0c9a7e52d84b36"
SECOND_KEY = "hornet-test-key-9b2e4d6f08a1c375"
FILE_KEY = "hornet-test-key-file-5d3a8c1e7f"
WRONG_KEY = "hornet-test-key-wrong-0000000000"
CHALLENGE = 'Bearer realm="hornet"'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def running(model_dir: Path, log_path: Path, *flags: str, env: dict | None = None, key=None):
    """`python -m service` over `model_dir` with `flags` and `env` (and no other HORNET_*
    variable), ready (asked with `key`, for servers whose probes need one); stopped at
    the end."""
    return running_server(
        ["--model-dir", str(model_dir), "--engine-threads", "1", *flags],
        log_path=log_path,
        env=env,
        inherit_settings=False,
        ready_headers=bearer(key) if key else None,
    )


@pytest.fixture(scope="module")
def open_server(classifier_dir, tmp_path_factory):
    """No key configured: the default."""
    log_path = tmp_path_factory.mktemp("open_server") / "server.log"
    with running(classifier_dir, log_path) as server:
        yield server.url


@pytest.fixture(scope="module")
def keyed_server(classifier_dir, tmp_path_factory):
    """Two keys from HORNET_API_KEYS (a rotation: old and new both accepted)."""
    log_path = tmp_path_factory.mktemp("keyed_server") / "server.log"
    env = {"HORNET_API_KEYS": f"{KEY}, {SECOND_KEY}"}
    with running(classifier_dir, log_path, env=env) as server:
        yield server.url, log_path


@pytest.fixture(scope="module")
def file_server(classifier_dir, tmp_path_factory):
    """A key from --api-key-file, with --protect-probes."""
    directory = tmp_path_factory.mktemp("file_server")
    key_file = directory / "keys"
    key_file.write_text(f"# mounted from the hornet-api-keys Secret\n\n  {FILE_KEY}  \n# end\n")
    flags = ("--api-key-file", str(key_file), "--protect-probes")
    with running(classifier_dir, directory / "server.log", *flags, key=FILE_KEY) as server:
        yield server.url


@pytest.fixture(scope="module")
def image() -> bytes:
    return encode(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))


def classify(base_url: str, image: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{base_url}/classify", files=upload(image), headers=headers, timeout=30)


def v2_infer_body() -> dict:
    pixels = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    tensor = {"name": "image", "shape": list(pixels.shape), "datatype": "UINT8"}
    return {"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}


# --- off by default ------------------------------------------------------------------------


def test_without_keys_no_route_asks_for_one(open_server, image) -> None:
    assert classify(open_server, image).status_code == 200
    assert httpx.get(f"{open_server}/v1/models").status_code == 200
    assert httpx.get(f"{open_server}/v2/models/tiny_cls").status_code == 200


def test_without_keys_the_openapi_document_has_no_security(open_server) -> None:
    document = httpx.get(f"{open_server}/openapi.json").json()
    assert "securitySchemes" not in document.get("components", {})
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert not any("security" in op or "401" in op["responses"] for op in operations)


# --- with keys -----------------------------------------------------------------------------


def test_a_request_without_a_key_gets_401_with_a_bearer_challenge(keyed_server, image) -> None:
    base_url, _ = keyed_server
    response = classify(base_url, image)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == CHALLENGE
    assert response.headers["x-request-id"]
    body = response.json()
    assert body["error"] == "unauthorized"
    assert "Authorization: Bearer" in body["detail"] and "X-API-Key" in body["detail"]


def test_a_wrong_key_gets_401_with_invalid_token(keyed_server, image) -> None:
    base_url, _ = keyed_server
    for headers in (bearer(WRONG_KEY), {"X-API-Key": WRONG_KEY}, bearer(KEY[:-1])):
        response = classify(base_url, image, headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == f'{CHALLENGE}, error="invalid_token"'
        assert response.json()["error"] == "unauthorized"


def test_a_refused_upload_closes_its_connection_and_a_refused_get_keeps_it(keyed_server):
    """A 401 answered before the body was read says `connection: close` and the server
    closes: it does not read (and throw away) an upload it refused. A 401 to a request
    without a body leaves the connection open for the next request."""
    base_url, _ = keyed_server
    connection = connect(base_url)
    send(connection, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    status, headers, _ = read_one_answer(connection)
    assert (status, headers.get("connection")) == (401, None)
    send(connection, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert read_one_answer(connection)[0] == 200
    size = 8 << 20
    head = b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
    send(connection, head + b"content-length: %d\r\n\r\n" % size + bytes(1 << 16))
    status, headers, body = parse_answer(read_until_closed(connection))
    assert (status, headers["connection"]) == (401, "close"), body
    connection.close()


def test_a_basic_authorization_header_is_no_key(keyed_server) -> None:
    base_url, _ = keyed_server
    response = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == CHALLENGE


def test_the_right_key_as_a_bearer_token_is_served(keyed_server, image) -> None:
    base_url, _ = keyed_server
    response = classify(base_url, image, bearer(KEY))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["top_k"]


def test_the_right_key_in_x_api_key_is_served(keyed_server, image) -> None:
    base_url, _ = keyed_server
    assert classify(base_url, image, {"X-API-Key": KEY}).status_code == 200


def test_the_second_of_two_keys_is_served(keyed_server) -> None:
    base_url, _ = keyed_server
    assert httpx.get(f"{base_url}/v1/models", headers=bearer(SECOND_KEY)).status_code == 200


def test_the_bearer_scheme_is_case_insensitive(keyed_server) -> None:
    base_url, _ = keyed_server
    headers = {"Authorization": f"bearer {KEY}"}
    assert httpx.get(f"{base_url}/v1/models", headers=headers).status_code == 200


def test_probes_metrics_and_docs_stay_open_by_default(keyed_server) -> None:
    base_url, _ = keyed_server
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{base_url}{path}").status_code == 200, path
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(f"{base_url}{path}").status_code == 200, path


def test_v2_routes_need_the_key_and_answer_in_the_kserve_error_shape(keyed_server) -> None:
    base_url, _ = keyed_server
    url = f"{base_url}/v2/models/tiny_cls/infer"
    refused = httpx.post(url, json=v2_infer_body(), timeout=30)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == CHALLENGE
    assert list(refused.json()) == ["error"]
    assert refused.json()["error"].startswith("unauthorized: ")
    for path in ("tiny_cls", "tiny_cls/config", "tiny_cls/stats", "stats"):
        assert httpx.get(f"{base_url}/v2/models/{path}").status_code == 401, path
    assert httpx.post(f"{base_url}/v2/repository/index").status_code == 401
    served = httpx.post(url, json=v2_infer_body(), headers=bearer(KEY), timeout=30)
    assert served.status_code == 200, served.text


def test_tritonclient_is_served_with_the_key_in_its_headers(keyed_server) -> None:
    base_url, _ = keyed_server
    client = httpclient.InferenceServerClient(base_url.removeprefix("http://"), network_timeout=30)
    pixels = np.zeros((2, 224, 224, 3), dtype=np.uint8)
    tensor = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    try:
        with pytest.raises(httpclient.InferenceServerException, match="unauthorized"):
            client.infer("tiny_cls", [tensor])
        result = client.infer("tiny_cls", [tensor], headers=bearer(KEY))
        assert client.is_server_ready()  # the probe needs no key
    finally:
        client.close()
    assert result.as_numpy("probabilities").shape == (2, 10)


def test_refusals_are_counted_in_the_request_metrics(keyed_server, image) -> None:
    """Under the route template the path matches, though refused before routing; a
    path no route has under "unmatched"."""
    base_url, _ = keyed_server
    classify(base_url, image, bearer(WRONG_KEY))
    assert httpx.get(f"{base_url}/v2/models/tiny_cls/ready").status_code == 401
    assert httpx.get(f"{base_url}/no/such/route").status_code == 401
    metrics = httpx.get(f"{base_url}/metrics").text
    assert 'hornet_requests_total{route="/classify",status="401"}' in metrics
    assert 'hornet_requests_total{route="/v2/models/{model}/ready",status="401"}' in metrics
    assert 'hornet_requests_total{route="unmatched",status="401"}' in metrics


def test_the_openapi_document_advertises_both_ways_to_send_a_key(keyed_server) -> None:
    base_url, _ = keyed_server
    document = httpx.get(f"{base_url}/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {"type": "http", "scheme": "bearer"}
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    classify_op = document["paths"]["/classify"]["post"]
    assert classify_op["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    unauthorized = classify_op["responses"]["401"]["content"]["application/json"]["schema"]
    assert unauthorized == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "ErrorResponse" in document["components"]["schemas"]
    assert "security" in document["paths"]["/v2/models/{model}/infer"]["post"]
    assert "security" not in document["paths"]["/healthz"]["get"]


def test_the_log_never_shows_a_key(keyed_server, image) -> None:
    base_url, log_path = keyed_server
    for headers in (bearer(KEY), {"X-API-Key": SECOND_KEY}, bearer(WRONG_KEY)):
        classify(base_url, image, headers)
        httpx.post(f"{base_url}/v2/models/tiny_cls/infer", json={"inputs": []}, headers=headers)
    httpx.get(f"{base_url}/v1/models", headers={"X-API-Key": WRONG_KEY})
    log = log_path.read_text()
    assert '"status": 401' in log and '"status": 200' in log  # the requests were logged
    for key in (KEY, SECOND_KEY, WRONG_KEY):
        assert key not in log
    assert "Bearer" not in log


# --- key file and protected probes ---------------------------------------------------------


def test_a_key_from_the_key_file_is_served(file_server, image) -> None:
    assert classify(file_server, image, bearer(FILE_KEY)).status_code == 200
    assert classify(file_server, image, {"X-API-Key": FILE_KEY}).status_code == 200


def test_comment_lines_of_the_key_file_are_no_keys(file_server) -> None:
    for comment in ("# mounted from the hornet-api-keys Secret", "# end", "#"):
        headers = {"X-API-Key": comment}
        assert httpx.get(f"{file_server}/v1/models", headers=headers).status_code == 401


def test_protected_probes_need_the_key(file_server) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        refused = httpx.get(f"{file_server}{path}")
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == CHALLENGE
        assert httpx.get(f"{file_server}{path}", headers=bearer(FILE_KEY)).status_code == 200


def test_docs_stay_open_even_with_protected_probes(file_server) -> None:
    assert httpx.get(f"{file_server}/docs").status_code == 200
    document = httpx.get(f"{file_server}/openapi.json").json()
    assert "security" in document["paths"]["/healthz"]["get"]


# --- settings ------------------------------------------------------------------------------


def test_settings_repr_hides_the_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"{FILE_KEY}\n")
    settings = Settings(model_dir=[tmp_path], api_keys=[KEY], api_key_file=key_file)
    assert KEY not in repr(settings) and KEY not in str(settings)
    assert FILE_KEY not in repr(settings)
    # the keys the server accepts (its KeyRing, as create_app makes it)
    accepted = KeyRing(settings.api_keys, settings.api_key_file).keys()
    assert accepted == [KEY.encode(), FILE_KEY.encode()]


def test_keys_from_the_environment_are_comma_separated(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HORNET_API_KEYS", f" {KEY}, ,{SECOND_KEY} ")
    settings = Settings(model_dir=[tmp_path])
    assert [k.get_secret_value() for k in settings.api_keys] == [KEY, SECOND_KEY]


def test_keys_are_off_by_default(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HORNET_API_KEYS", raising=False)
    monkeypatch.delenv("HORNET_API_KEY_FILE", raising=False)
    settings = Settings(model_dir=[tmp_path])
    keys = KeyRing(settings.api_keys, settings.api_key_file)
    assert not keys.enabled and keys.keys() == [] and settings.protect_probes is False


def test_repeated_api_key_flags_give_several_keys() -> None:
    settings = cli.load_settings(["--model-dir", "x", "--api-key", KEY, "--api-key", SECOND_KEY])
    assert settings.api_keys == [SecretStr(KEY), SecretStr(SECOND_KEY)]


@pytest.mark.parametrize(
    "content", [None, "", "# only a comment\n\n"], ids=["missing", "empty", "comments"]
)
def test_a_key_file_without_keys_is_a_settings_error_naming_it(content, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ValidationError, match=str(key_file)):
        Settings(model_dir=[tmp_path], api_key_file=key_file)


def test_the_cli_refuses_a_missing_key_file_with_status_2(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert cli.serve_main(["--model-dir", "x", "--api-key-file", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_protecting_probes_without_keys_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="protect_probes needs API keys"):
        Settings(model_dir=[tmp_path], protect_probes=True)


def test_a_key_file_error_does_not_show_the_other_keys(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(model_dir=[tmp_path], api_keys=KEY, api_key_file=tmp_path / "nope")
    assert KEY not in str(error.value)


# --- key comparison ------------------------------------------------------------------------


def test_key_matches_any_configured_key_exactly() -> None:
    keys = [KEY.encode(), SECOND_KEY.encode()]
    assert key_matches(KEY.encode(), keys) and key_matches(SECOND_KEY.encode(), keys)
    for near in (KEY[:-1], KEY + "0", KEY.upper(), "", f"{KEY},{SECOND_KEY}"):
        assert not key_matches(near.encode(), keys), near
    assert not key_matches(KEY.encode(), [])


def test_key_matches_compares_every_key(monkeypatch) -> None:
    compared = []
    real_compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert key_matches(b"first", [b"first", b"second", b"third"])
    assert len(compared) == 3


# --- key rotation through the key file -----------------------------------------------------


class MountedSecret:
    """A key file laid out as Kubernetes mounts a Secret: `keys` links to `..data/keys`,
    `..data` to a timestamped directory, and an update writes a new directory and swaps
    the `..data` link in one rename (what the kubelet does when the Secret changes)."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.version = directory, 0
        self.file = directory / "keys"

    def write(self, text: str) -> None:
        self.version += 1
        target = self.directory / f"..2026_12_05_{self.version:02d}"
        target.mkdir()
        (target / "keys").write_text(text)
        swap = self.directory / "..data_tmp"
        swap.symlink_to(target.name)
        swap.rename(self.directory / "..data")
        if not self.file.is_symlink():
            self.file.symlink_to("..data/keys")

    def remove(self) -> None:
        (self.directory / "..data").unlink()


def eventually(check, timeout_s: float = 10.0) -> None:
    """Wait until `check()` is true (the server reads the file again within a second or
    two of a change)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the server never took the key file's change"
        time.sleep(0.1)


def test_keys_rotate_through_the_key_file_without_a_restart(classifier_dir, tmp_path) -> None:
    """A real server on a mounted-Secret key file, asked over REST and gRPC: the next key
    is added, the old one removed, each change taken within seconds, with no restart; a
    change to a file without keys, or the file gone, keeps the keys it had (logged once,
    without a key), never opening the server."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from service.testing import LOOPBACK, free_port

    secret = MountedSecret(tmp_path)
    secret.write(f"{KEY}\n")
    port, log_path = free_port(), tmp_path / "server.log"
    flags = ("--api-key-file", str(secret.file), "--grpc-port", str(port))
    with running(classifier_dir, log_path, *flags) as server:
        client = grpcclient.InferenceServerClient(f"{LOOPBACK}:{port}")

        def rest(key: str) -> int:
            return httpx.get(f"{server.url}/v1/models", headers=bearer(key)).status_code

        def grpc_ok(key: str) -> bool:
            try:
                return client.is_model_ready("tiny_cls", headers={"x-api-key": key})
            except grpcclient.InferenceServerException as refused:
                assert refused.status() == "StatusCode.UNAUTHENTICATED", refused
                return False

        assert (rest(KEY), rest(SECOND_KEY)) == (200, 401)
        secret.write(f"# rotating\n{KEY}\n{SECOND_KEY}\n")  # the next key added
        eventually(lambda: rest(SECOND_KEY) == 200)
        assert rest(KEY) == 200 and grpc_ok(SECOND_KEY) and grpc_ok(KEY)
        secret.write(f"{SECOND_KEY}\n")  # the old one removed
        eventually(lambda: rest(KEY) == 401)
        assert rest(SECOND_KEY) == 200 and grpc_ok(SECOND_KEY) and not grpc_ok(KEY)

        secret.write("# emptied by mistake\n")
        # the file is looked at as requests ask for keys
        eventually(lambda: rest(SECOND_KEY) == 200 and "holds no key" in log_path.read_text())
        assert (rest(SECOND_KEY), rest(KEY), rest("# emptied by mistake")) == (200, 401, 401)
        secret.remove()
        eventually(lambda: rest(SECOND_KEY) == 200 and "cannot read it" in log_path.read_text())
        assert rest(SECOND_KEY) == 200 and httpx.get(f"{server.url}/v1/models").status_code == 401
        client.close()
    log = log_path.read_text()
    assert log.count("holds no key") == 1 and log.count("cannot read it") == 1  # said once
    assert KEY not in log and SECOND_KEY not in log


def test_the_key_file_is_looked_at_once_a_second_at_most(tmp_path) -> None:
    from service.auth import KEY_FILE_CHECK_S

    now = [0.0]
    secret = MountedSecret(tmp_path)
    secret.write(f"{KEY}\n")
    ring = KeyRing([SecretStr(SECOND_KEY)], secret.file, clock=lambda: now[0])
    assert ring.enabled and ring.keys() == [SECOND_KEY.encode(), KEY.encode()]
    secret.write(f"{FILE_KEY}\n")
    now[0] += KEY_FILE_CHECK_S / 2
    assert ring.keys() == [SECOND_KEY.encode(), KEY.encode()]  # not looked at yet
    now[0] += KEY_FILE_CHECK_S / 2
    assert ring.keys() == [SECOND_KEY.encode(), FILE_KEY.encode()]
    assert not KeyRing([]).enabled and KeyRing([]).keys() == []
