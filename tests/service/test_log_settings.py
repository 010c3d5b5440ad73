"""Triton's logging extension (`GET` and `POST /v2/logging`, gRPC `LogSettings`): a real
server's log settings read and changed through tritonclient's own `get_log_settings` and
`update_log_settings` over REST and gRPC, and what the server then writes to its log
compared with what the settings say; changes refused without --allow-log-settings, a bad
change refused whole, a key needed where keys are set."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from service.logs import LogSwitches
from service.testing import free_port, running_server
from tests.helpers import bundles
from tests.helpers.images import encode

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TIMEOUT_S = 60
DEFAULTS = {
    "log_file": "",
    "log_info": True,
    "log_warnings": True,
    "log_errors": True,
    "log_verbose_level": 0,
    "log_format": "json",
}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return bundles.write_classifier(tmp_path_factory.mktemp("log-settings") / "classifier")


def _serve(classifier: Path, tmp_path: Path, *flags: str, env: dict | None = None):
    grpc_port = free_port()
    log = tmp_path / f"server-{grpc_port}.log"
    server = running_server(
        ["--model-dir", str(classifier), "--grpc-port", str(grpc_port), *flags],
        log_path=log,
        env=env,
        inherit_settings=False,
    )
    return server, grpc_port, log


def _lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _classify(url: str) -> str:
    """One request answered; its request id."""
    from skimage import data

    image = encode(data.coffee(), "JPEG")
    answer = httpx.post(
        f"{url}/classify", content=image, headers={"content-type": "image/jpeg"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return answer.headers["x-request-id"]


def _written(log: Path, rid: str) -> list[dict]:
    """The lines of request `rid`, once its access line had time to be written."""
    time.sleep(0.3)
    return [
        line
        for line in _lines(log)
        if line.get("request_id") == rid or rid in line.get("request_ids", [])
    ]


def test_settings_change_what_the_server_writes_over_rest_and_grpc(classifier, tmp_path):
    server, grpc_port, log = _serve(
        classifier, tmp_path, "--allow-log-settings", "--log-level", "warning"
    )
    with server as running:
        rest = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
        remote = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert "logging" in rest.get_server_metadata()["extensions"]
        started = {**DEFAULTS, "log_info": False}  # --log-level warning
        assert rest.get_log_settings() == started
        grpc_settings = remote.get_log_settings(as_json=True)["settings"]
        assert {k: next(iter(v.values())) for k, v in grpc_settings.items()} == started

        # info off: a request leaves no access line
        assert [line["logger"] for line in _written(log, _classify(running.url))] == []

        # info on (REST): its access line, and no debug line
        assert rest.update_log_settings({"log_info": True}) == DEFAULTS
        lines = _written(log, _classify(running.url))
        assert [(line["logger"], line["level"]) for line in lines] == [("hornet.access", "info")]

        # verbose (gRPC): the debug line of the batch that held it, beside its access line
        remote.update_log_settings({"log_verbose_level": 1})
        assert rest.get_log_settings()["log_verbose_level"] == 1
        rid = _classify(running.url)
        batch = [line for line in _written(log, rid) if line["message"] == "batch ran"]
        assert len(batch) == 1 and batch[0]["level"] == "debug"
        assert batch[0]["request_ids"] == [rid] and batch[0]["batch_size"] == 1
        assert batch[0]["model"] == "tiny_cls" and batch[0]["outcome"] == "ok"
        assert batch[0]["engine_ms"] > 0 and len(batch[0]["queue_ms"]) == 1

        # everything off but errors: nothing for a request; the change itself recorded
        settings = rest.update_log_settings(
            {"log_info": False, "log_warnings": False, "log_verbose_level": 0}
        )
        assert settings == {**DEFAULTS, "log_info": False, "log_warnings": False}
        assert _written(log, _classify(running.url)) == []
        changes = [line for line in _lines(log) if line["message"] == "log settings changed"]
        assert [line["changed"] for line in changes] == [
            {"log_info": True},
            {"log_verbose_level": 1},
            {"log_info": False, "log_warnings": False, "log_verbose_level": 0},
        ]


def test_a_change_is_refused_whole_with_each_reason(classifier, tmp_path):
    server, grpc_port, log = _serve(classifier, tmp_path, "--allow-log-settings")
    with server as running:
        url = f"{running.url}/v2/logging"
        bad = {
            "log_file": "/tmp/elsewhere.log",
            "log_format": "ISO8601",
            "log_verbose_level": -1,
            "log_errors": "no",
            "log_colour": True,
            "log_info": False,  # valid, yet not applied with the others
        }
        answer = httpx.post(url, json=bad, timeout=TIMEOUT_S)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error.startswith("invalid_parameters: ")
        for said in (
            "log_file is '' only",
            "log_format is 'json' only",
            "log_verbose_level is an integer from 0 to 4294967295",
            "log_errors is a boolean",
            "unknown log setting 'log_colour'",
        ):
            assert said in error
        for body in (b"[1]", b"{", b'{"log_verbose_level": 1.5}', b'{"log_info": 1}'):
            assert httpx.post(url, content=body, timeout=TIMEOUT_S).status_code == 422
        too_long = httpx.post(url, content=b" " * 5000, timeout=TIMEOUT_S)
        assert too_long.status_code == 413
        assert httpx.get(url, timeout=TIMEOUT_S).json() == DEFAULTS  # nothing applied

        # gRPC: a setting of the wrong kind (tritonclient picks the kind by the name)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.LogSettingsRequest()
            request.settings["log_info"].uint32_param = 1
            request.settings["log_warnings"].bool_param = False
            with pytest.raises(grpc.RpcError) as refused:
                stub.LogSettings(request, timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "log_info is a boolean" in refused.value.details()
        assert httpx.get(url, timeout=TIMEOUT_S).json() == DEFAULTS
    assert not any(line["message"] == "log settings changed" for line in _lines(log))


def test_a_whole_number_written_with_a_fraction_is_taken_as_the_integer(classifier, tmp_path):
    """The document says `log_verbose_level` is an integer, and JSON Schema's integer
    includes 2.0: taken as 2 (1.5 stays refused, above)."""
    server, _, _ = _serve(classifier, tmp_path, "--allow-log-settings")
    with server as running:
        url = f"{running.url}/v2/logging"
        answer = httpx.post(url, content=b'{"log_verbose_level": 2.0}', timeout=TIMEOUT_S)
        assert answer.status_code == 200, answer.text
        assert b'"log_verbose_level":2,' in answer.content
        assert httpx.get(url, timeout=TIMEOUT_S).json()["log_verbose_level"] == 2


def test_changes_need_the_flag_and_a_key_where_keys_are_set(classifier, tmp_path):
    server, grpc_port, log = _serve(classifier, tmp_path)
    with server as running:
        rest = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
        remote = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert rest.get_log_settings() == DEFAULTS  # reading needs no flag
        # GET and POST are two routes: a 405 names both (Starlette's named the first's)
        other = httpx.delete(f"{running.url}/v2/logging")
        assert other.status_code == 405 and other.headers["allow"] == "GET, POST"
        assert httpx.post(f"{running.url}/v2/logging", json={}).json() == DEFAULTS
        with pytest.raises(InferenceServerException) as refused:
            rest.update_log_settings({"log_info": False})
        assert refused.value.status() == "403"
        assert "log_settings_off" in refused.value.message()
        assert "--allow-log-settings" in refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            remote.update_log_settings({"log_verbose_level": 2})
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        assert rest.get_log_settings() == DEFAULTS

    key = "log-settings-key-6b1f"
    server, grpc_port, log = _serve(
        classifier, tmp_path, "--allow-log-settings", env={"HORNET_API_KEYS": key}
    )
    with server as running:
        url = f"{running.url}/v2/logging"
        assert httpx.post(url, json={"log_info": False}).status_code == 401
        assert httpx.get(url).status_code == 401
        remote = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException) as refused:
            remote.update_log_settings({"log_info": False})
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        headers = {"Authorization": f"Bearer {key}"}
        changed = httpx.post(url, json={"log_verbose_level": 3}, headers=headers)
        assert changed.status_code == 200 and changed.json()["log_verbose_level"] == 3
    assert key not in log.read_text()


def test_flag_without_keys_is_warned_of_and_trace_level_refused(classifier, tmp_path):
    server, _, log = _serve(classifier, tmp_path, "--allow-log-settings")
    with server:
        pass
    warned = [line["message"] for line in _lines(log) if line["level"] == "warning"]
    assert any(m.startswith("--allow-log-settings without API keys") for m in warned)
    # uvicorn's trace level would log every ASGI message, headers (and keys) included
    with pytest.raises(Exception, match="exited|status|ready"):
        with running_server(
            ["--model-dir", str(classifier), "--log-level", "trace"],
            log_path=tmp_path / "trace.log",
            inherit_settings=False,
            ready_timeout_s=20,
        ):
            pass
    assert "--log-level: invalid choice: 'trace'" in (tmp_path / "trace.log").read_text()


@pytest.fixture
def loggers_kept():
    """The routed loggers' levels as they were before a test moved them."""
    names = ("hornet", "uvicorn", "uvicorn.error")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("hornet.test", level, __file__, 1, "m", None, None)


@pytest.mark.parametrize("info", [True, False])
@pytest.mark.parametrize("warnings", [True, False])
@pytest.mark.parametrize("errors", [True, False])
@pytest.mark.parametrize("verbose", [0, 1, 7])
def test_each_switch_lets_through_its_own_severity(info, warnings, errors, verbose, loggers_kept):
    """Triton's settings are one switch per severity, not a threshold: each severity is
    written exactly when its own switch is on (debug: a verbose level above 0), critical
    always."""
    switches = LogSwitches()
    switches.update(
        {"log_info": info, "log_warnings": warnings, "log_errors": errors,
         "log_verbose_level": verbose}
    )  # fmt: skip
    written = {
        level: switches.filter(_record(level))
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
    }
    expected = {
        logging.DEBUG: verbose > 0,
        logging.INFO: info,
        logging.WARNING: warnings,
        logging.ERROR: errors,
    }
    assert written == expected
    assert switches.filter(_record(logging.CRITICAL))
    always = _record(logging.INFO)
    always._always = True
    assert switches.filter(always)
    enabled = [verbose > 0, info, warnings, errors]
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]
    lowest = next((lv for on, lv in zip(enabled, levels, strict=True) if on), logging.CRITICAL)
    assert logging.getLogger("hornet").level == lowest


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", (True, True, True, 1)),
        ("info", (True, True, True, 0)),
        ("warning", (False, True, True, 0)),
        ("error", (False, False, True, 0)),
        ("critical", (False, False, False, 0)),
    ],
)
def test_the_start_level_sets_the_switches(level, expected, loggers_kept):
    switches = LogSwitches()
    switches.start_at(level)
    settings = switches.settings()
    keys = ("log_info", "log_warnings", "log_errors", "log_verbose_level")
    assert tuple(settings[key] for key in keys) == expected
