"""A setting the server cannot run with is refused in one line per problem, naming its
flag and environment variable, never quoting a secret; an environment variable named like
a setting that is none is said at start; and a bad environment does not break the other
`hornet` commands."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from pydantic import ValidationError

from hornet_cli import subcommand_parsers
from service import cli
from service.flags import _without_none, settings_problems, unknown_environment
from service.settings import Settings
from tests.helpers.demo import bundle_dir

CLASSIFIER = str(bundle_dir("classify"))


@pytest.fixture(autouse=True)
def _no_hornet_environment(monkeypatch):
    for name in [n for n in os.environ if n.upper().startswith("HORNET_")]:
        monkeypatch.delenv(name)


def _float_settings() -> list[str]:
    return [n for n, f in Settings.model_fields.items() if _without_none(f.annotation) is float]


def _refusal(capsys, argv: list[str]) -> list[str]:
    """`hornet serve ARGV` refused with status 2: its standard error's lines."""
    assert cli.serve_main(["--model-dir", CLASSIFIER, *argv]) == 2
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("name", _float_settings())
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_no_float_setting_takes_infinity_or_nan(name: str, value: float) -> None:
    """Infinity passed every bound and failed later: --max-upload-mb inf with a traceback
    at start, --jpeg-reducing-gap inf answering every JPEG 400 as if it were bad."""
    with pytest.raises(ValidationError, match="finite number"):
        Settings(**{name: value})


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("HORNET_MAX_UPLOAD_MB", "-1", "--max-upload-mb"),
        ("HORNET_MAX_UPLOAD_MB", "inf", "--max-upload-mb"),  # a traceback at start before
        ("HORNET_JPEG_REDUCING_GAP", "inf", "--jpeg-reducing-gap"),
        ("HORNET_DECODE_THREADS", "1" + "0" * 20, "--decode-threads"),  # OverflowError
        ("HORNET_IMAGE_CACHE_MIB", "1" + "0" * 20, "--image-cache-mib"),  # OverflowError
        ("HORNET_ENGINE_THREADS", "100000", "--engine-threads"),  # the runtime's own error
        ("HORNET_MAX_BATCH_SIZE", "many", "--max-batch-size"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_flag_variable_and_value(
    capsys, monkeypatch, variable: str, value: str, flag: str
) -> None:
    monkeypatch.setenv(variable, value)
    (line,) = _refusal(capsys, [])
    assert line.startswith(f"hornet serve: invalid setting: {flag} ({variable}): ")
    assert line.endswith(f", given {value!r}") and "Traceback" not in line


def test_a_bad_flag_value_names_the_flag_and_the_value(capsys) -> None:
    assert _refusal(capsys, ["--max-upload-mb", "-1"]) == [
        "hornet serve: invalid setting: --max-upload-mb (HORNET_MAX_UPLOAD_MB): input should "
        "be greater than 0, given '-1.0'"
    ]


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_a_refusal_never_quotes_an_api_key(capsys, monkeypatch, where: str) -> None:
    """pydantic's own text quoted a check over several settings with its whole input, the
    API keys in it: `hornet serve --api-key K --port 8000 --grpc-port 8000` printed K."""
    key = "k3y-that-must-not-be-printed"
    argv = ["--port", "8000", "--grpc-port", "8000"]
    if where == "flag":
        argv += ["--api-key", key]
    else:
        monkeypatch.setenv("HORNET_API_KEYS", key)
    lines = _refusal(capsys, argv)
    assert lines == [
        "hornet serve: invalid setting: --port and --grpc-port are both 8000: give each its own"
    ]
    assert not any(key[:6] in line for line in lines)


def test_a_secret_field_s_own_problem_is_named_without_its_value() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(api_keys=[["not", "a", "string"]])
    problems = settings_problems(Settings, raised.value)
    assert problems and all(p.startswith("--api-key (HORNET_API_KEYS): ") for p in problems)
    assert not any("given" in p or "string'" in p for p in problems)


def test_other_commands_parse_whatever_the_server_s_environment_holds(monkeypatch) -> None:
    """The `hornet` parser read the server's settings from the environment for `hornet
    tune`'s default batch size: a bad HORNET_ value broke every command, `hornet export
    --help` included, with pydantic's traceback."""
    monkeypatch.setenv("HORNET_MAX_UPLOAD_MB", "-1")
    monkeypatch.setenv("HORNET_MAX_BATCH_SIZE", "3")
    parsers = subcommand_parsers()
    assert {"serve", "export", "tune"} <= set(parsers)
    # tune's default is the setting's own default, the environment being checked when it runs
    assert parsers["tune"].parse_args([CLASSIFIER]).max_batch_size == 8


def test_hornet_tune_refuses_a_bad_environment_in_one_line(capsys, monkeypatch) -> None:
    from service.tuning import tune

    monkeypatch.setenv("HORNET_MAX_UPLOAD_MB", "inf")
    args = subcommand_parsers()["tune"].parse_args([CLASSIFIER])
    assert tune(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "hornet tune: invalid setting: --max-upload-mb (HORNET_MAX_UPLOAD_MB): input should "
        "be a finite number, given 'inf'"
    ]


def test_unknown_environment_names_the_nearest_setting() -> None:
    environ = {
        "HORNET_MAX_UPLOAD": "5",
        "hornet_api_key": "secret",  # pydantic-settings reads names in any case
        "HORNET_MAX_UPLOAD_MB": "5",
        "HORNET_SERVE_SERVICE_HOST": "10.0.0.1",  # a Kubernetes service link
        "PATH": "/bin",
    }
    assert unknown_environment(Settings, environ) == {
        "HORNET_MAX_UPLOAD": "HORNET_MAX_UPLOAD_MB",
        "HORNET_SERVE_SERVICE_HOST": "",
        "hornet_api_key": "HORNET_API_KEYS",
    }


def test_the_server_says_which_environment_variables_it_ignored(tmp_path) -> None:
    """A mistyped variable was ignored without a word: HORNET_API_KEY (for
    HORNET_API_KEYS) left the server open. Said at start (here `--check`, the preflight),
    by name and nearest setting, never with its value."""
    environ = {n: v for n, v in os.environ.items() if not n.upper().startswith("HORNET_")}
    environ |= {"HORNET_API_KEY": "value-not-to-log", "HORNET_MAX_UPLOAD": "5"}
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-dir", CLASSIFIER, "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    assert "value-not-to-log" not in done.stderr + done.stdout
    warnings = [
        line
        for line in map(json.loads, filter(None, done.stderr.splitlines()))
        if line["message"].startswith("environment variables named like settings")
    ]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert warnings[0]["ignored"] == ["HORNET_API_KEY", "HORNET_MAX_UPLOAD"]
    assert warnings[0]["did_you_mean"] == {
        "HORNET_API_KEY": "HORNET_API_KEYS",
        "HORNET_MAX_UPLOAD": "HORNET_MAX_UPLOAD_MB",
    }


def test_a_certificate_that_does_not_load_is_not_blamed_on_the_key_flag(capsys, tmp_path) -> None:
    """The pair was checked as the key's field: a certificate given alone, and wrong,
    was refused as "--tls-keyfile (HORNET_TLS_KEYFILE): ..."."""
    text = tmp_path / "cert.pem"
    text.write_text("not a certificate\n")
    (line,) = _refusal(capsys, ["--tls-certfile", str(text)])
    assert line.startswith(f"hornet serve: invalid setting: TLS: {text} does not hold a PEM")
    assert "--tls-keyfile (" not in line


def test_a_url_s_credentials_are_never_quoted(capsys) -> None:
    """The collector URL's check quoted it whole, user and password included."""
    (line,) = _refusal(capsys, ["--trace-endpoint", "ftp://tracer:pa55word@collector:4318"])
    assert line.startswith("hornet serve: invalid setting: --trace-endpoint (")
    assert line.endswith("given 'ftp://***@collector:4318'")
    assert "pa55word" not in line and "tracer" not in line


def test_two_bundles_of_one_name_are_refused_before_any_loads(capsys, tmp_path) -> None:
    """The same directory given twice loaded the first, then stopped at the second
    ("model loading failed", status 1), after compiling its engines."""
    twin = tmp_path / "twin"
    shutil.copytree(CLASSIFIER, twin)
    assert cli.serve_main(["--model-dir", CLASSIFIER, "--model-dir", str(twin)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "hornet serve: several bundles are of a model named 'shapes_classify': "
        f"{CLASSIFIER}, {twin}"
    ]
