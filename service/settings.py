"""The service's settings: environment variables (prefix `ANOSCOPE_`) and an optional settings file.

Sources, highest priority first: arguments passed in code (e.g. `anoscope serve --port`), environment
variables, the settings file (`ANOSCOPE_SETTINGS_FILE`, else `.env` in the working directory when it
exists), the defaults below. Limits are server-side only: no request can change them.

List settings (`providers`, `api_keys`, `cors_origins`) are comma-separated strings, e.g.
`ANOSCOPE_API_KEYS=key-one,key-two`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "ANOSCOPE_"
SETTINGS_FILE_VAR = "ANOSCOPE_SETTINGS_FILE"
#: Where the packaged default model lives (`service/assets/models/demo/`).
PACKAGED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "models"
KNOWN_PROVIDERS = ("tensorrt", "cuda", "cpu")
MIN_API_KEY_LENGTH = 16
_KEY_HINT = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Everything an operator can configure. Field names map to `ANOSCOPE_<NAME>` variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        # Other tools' variables may share a .env file; unknown ANOSCOPE_* names are reported by
        # `unknown_names` and logged at start-up instead.
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # a rejected API key must not end up in a log via the error message
        protected_namespaces=(),
    )

    model_dir: Path = Field(
        default=PACKAGED_MODEL_DIR,
        description="folder of bundles, one sub-folder each (the folder may also be a single bundle)",
    )
    default_model: str = Field(
        default="demo",
        description="model served by POST /v1/predict; when left at 'demo' and that is absent, the only model",
    )
    host: str = Field(default="127.0.0.1", description="address to bind; 0.0.0.0 exposes the service")
    port: int = Field(default=8000, ge=1, le=65535)
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("cuda", "cpu"), description="execution providers in order of preference; the CPU always ends it"
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, le=256, description="ONNX Runtime threads per model; unset = one per core"
    )
    worker_threads: int = Field(
        default_factory=lambda: max(2, os.cpu_count() or 2),
        ge=1,
        le=256,
        description="threads for decoding, pre- and post-processing (bounds their memory too)",
    )
    max_batch_size: int = Field(default=8, ge=1, le=1024, description="images per inference batch")
    max_batch_wait_ms: float = Field(
        default=2.0, ge=0, le=1000, description="how long a batch waits for more images once it has one"
    )
    max_queue: int = Field(
        default=64, ge=1, le=100_000, description="images in flight per model; beyond it requests get 503"
    )
    inference_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest one inference batch may take; past it its requests (and, while the engine stays "
        "stuck, every later one) get 503",
    )
    load_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="longest loading and warming up one model may take (at start-up and on reload); past it the "
        "model is reported as failed and the service goes on without it",
    )
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest request body accepted")
    max_pixels: int = Field(default=40_000_000, ge=1, description="largest image (width x height) decoded")
    max_files: int = Field(default=16, ge=1, le=1024, description="most images in one request")
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(), description="accepted X-API-Key values, comma-separated; empty = no authentication"
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="origins allowed by CORS, comma-separated; empty = CORS off"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    archive_dir: Path | None = Field(
        default=None,
        description="folder where every image the service flags is kept with its answer (and every Nth other "
        "image, see archive_passed_every), for review and recalibration; unset = nothing is kept",
    )
    archive_passed_every: int = Field(
        default=0, ge=0, description="also keep every Nth image that was not flagged; 0 = flagged images only"
    )
    archive_max_files: int = Field(
        default=10_000, ge=1, description="most images the archive keeps per model and folder; the oldest go first"
    )

    @field_validator("providers", "cors_origins", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return _split_commas(value)

    @field_validator("archive_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `ANOSCOPE_ARCHIVE_DIR=` switches archiving off; as a path it would be "." (the working directory)
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        value = tuple(p.lower() for p in value)
        unknown = [p for p in value if p not in KNOWN_PROVIDERS]
        if unknown or not value:
            msg = f"providers {list(value)} must be a non-empty list drawn from {', '.join(KNOWN_PROVIDERS)}"
            raise ValueError(msg)
        return value

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(value, 1):
            secret = key.get_secret_value()
            # The message names the key's position, never its value: settings errors end up in logs.
            if len(secret) < MIN_API_KEY_LENGTH or any(c.isspace() for c in secret) or not secret.isascii():
                msg = (
                    f"API key #{i} is too weak: keys must be at least {MIN_API_KEY_LENGTH} printable ASCII "
                    f"characters without spaces; {_KEY_HINT}"
                )
                raise ValueError(msg)
        return value

    @field_validator("model_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_queue < self.max_files:
            msg = (
                f"max_queue ({self.max_queue}) is smaller than max_files ({self.max_files}): a request with "
                "max_files images could never be admitted; raise ANOSCOPE_MAX_QUEUE or lower ANOSCOPE_MAX_FILES"
            )
            raise ValueError(msg)
        if "*" in self.cors_origins and len(self.cors_origins) > 1:
            msg = "cors_origins mixes '*' with named origins; use either '*' or a list of origins"
            raise ValueError(msg)
        return self

    @property
    def default_model_explicit(self) -> bool:
        """Whether `default_model` was configured rather than left at its default."""
        return "default_model" in self.model_fields_set

    def api_key_bytes(self) -> tuple[bytes, ...]:
        return tuple(k.get_secret_value().encode("ascii") for k in self.api_keys)

    def warnings(self) -> list[str]:
        """Risky but allowed configurations, logged loudly at start-up."""
        found = []
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.api_keys:
            found.append(
                f"the service binds {self.host} without API keys: anyone who can reach this port can use it; "
                "set ANOSCOPE_API_KEYS (comma-separated) to require an X-API-Key header"
            )
        if "*" in self.cors_origins:
            found.append("CORS allows every origin ('*'); list the operator origins in ANOSCOPE_CORS_ORIGINS")
        return found


def _dotenv_names(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    names = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            names.append(line.split("=", 1)[0].removeprefix("export ").strip())
    return names


def unknown_names(env_file: Path | None = None) -> list[str]:
    """`ANOSCOPE_*` names in the environment or settings file that match no setting (likely typos)."""
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | {SETTINGS_FILE_VAR}
    names = [n for n in os.environ if n.upper().startswith(ENV_PREFIX)]
    if env_file is not None:
        names += [n for n in _dotenv_names(env_file) if n.upper().startswith(ENV_PREFIX)]
    return sorted({n for n in names if n.upper() not in known})


def settings_file() -> Path | None:
    """The settings file in use: `ANOSCOPE_SETTINGS_FILE`, else `./.env` when it exists."""
    named = os.environ.get(SETTINGS_FILE_VAR)
    if named:
        return Path(named).expanduser()
    default = Path(".env")
    return default if default.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and the settings file, with `overrides` on top.

    `ANOSCOPE_SETTINGS_FILE` names the settings file; it must exist when set. Otherwise `.env` in the
    working directory is read when present.
    """
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        msg = f"unknown settings {unknown}; known: {', '.join(Settings.model_fields)}"
        raise TypeError(msg)
    path = settings_file()
    if path is not None and not path.is_file():
        msg = f"{SETTINGS_FILE_VAR} points at {path}, which is not a file; fix the path or unset it"
        raise FileNotFoundError(msg)
    return Settings(_env_file=path, **overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests pass their own to `create_app` instead."""
    return load_settings()
