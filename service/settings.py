"""Service settings: every `hornet serve` flag, also settable as a HORNET_* variable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.manifest import MANIFEST_NAME

DEMO_BUNDLES_DIR = Path(__file__).parent / "demo_bundles"


def default_model_dirs() -> list[Path]:
    """Bundles served when no --model-dir is given: every bundle directory (one holding a
    manifest.json) under the package's demo_bundles/, in name order; none if it is absent."""
    if not DEMO_BUNDLES_DIR.is_dir():
        return []
    return sorted(p for p in DEMO_BUNDLES_DIR.iterdir() if (p / MANIFEST_NAME).is_file())


def read_api_key_file(path: Path) -> list[SecretStr]:
    """The keys in `path`, one a line; blank lines and lines starting with `#` are skipped,
    so a mounted Kubernetes Secret can list the current and the next key while rotating."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"API key file {path}: cannot read it: {reason}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(
            f"API key file {path} holds no key (one a line; blank lines and # comments are ignored)"
        )
    return [SecretStr(key) for key in keys]


class Settings(BaseSettings):
    """What the server runs and the limits that keep it standing.

    `model_dir` accepts a list, or in the environment a comma-separated string
    (HORNET_MODEL_DIR=bundles/a,bundles/b).
    """

    model_config = SettingsConfigDict(env_prefix="HORNET_", extra="forbid")

    model_dir: Annotated[list[Path], NoDecode] = Field(default_factory=default_model_dirs)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    engine: Literal["onnxruntime", "tensorrt", "torch"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "fp16"] | None = None
    ort_tensorrt: bool = False
    cuda_tf32: bool = False
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_delay_ms: float = Field(5.0, ge=0)
    max_queue_size: int = Field(64, ge=1)
    instances: int = Field(1, ge=1, le=64)
    request_timeout_s: float = Field(30.0, gt=0)
    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    engine_threads: int = Field(0, ge=0)
    decode_threads: int = Field(0, ge=0)
    max_aspect_ratio: float = Field(0.0, ge=0)
    engine_spinning: bool = False
    drain_timeout_s: float = Field(10.0, ge=0)
    log_level: str = "info"
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    protect_probes: bool = False

    @field_validator("model_dir", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        if isinstance(value, Path):
            return [value]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # No format checks here: pydantic would print the raw value (the keys) in its error.
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            return value
        stripped = (key.strip() if isinstance(key, str) else key for key in value)
        return [key for key in stripped if key != ""]

    @field_validator("api_key_file")
    @classmethod
    def _key_file_holds_keys(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_api_key_file(value)
        return value

    @model_validator(mode="after")
    def _probes_protected_only_with_keys(self) -> Settings:
        # Fires only when no key is configured, so its error cannot show one.
        if self.protect_probes and not (self.api_keys or self.api_key_file):
            raise ValueError(
                "protect_probes needs API keys to check: give --api-key-file "
                "(HORNET_API_KEY_FILE) or HORNET_API_KEYS"
            )
        return self

    def accepted_api_keys(self) -> list[SecretStr]:
        """Every key a request may present: api_keys, then the lines of api_key_file.
        Empty means authentication is off."""
        from_file = read_api_key_file(self.api_key_file) if self.api_key_file else []
        return [*self.api_keys, *from_file]

    @property
    def uses_demo_bundles(self) -> bool:
        """True when no model directory was given and the packaged demos are served."""
        return "model_dir" not in self.model_fields_set and bool(self.model_dir)

    @property
    def decode_workers(self) -> int:
        """Threads decoding and preprocessing uploads: decode_threads, or one per CPU.
        Each holds at most one decoded image, which bounds their memory together."""
        return self.decode_threads or os.cpu_count() or 1

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
