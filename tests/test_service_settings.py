"""Settings: defaults, environment and settings file, refusals and warnings at start-up."""

from __future__ import annotations

import logging
import re

import pytest
from pydantic import ValidationError

from service import settings as settings_module
from service.settings import PACKAGED_MODEL_DIR, Settings, get_settings, load_settings, unknown_names

KEY = "0123456789abcdef-key"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ANOSCOPE_* variables from the outside, and no stray .env in the working directory."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("ANOSCOPE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_documented_contract():
    s = load_settings()
    assert s.model_dir == PACKAGED_MODEL_DIR == settings_module.Path(settings_module.__file__).parent / "assets/models"
    assert (s.default_model, s.host, s.port) == ("demo", "127.0.0.1", 8000)
    assert s.providers == ("cuda", "cpu") and s.intra_op_threads is None
    assert (s.max_batch_size, s.max_batch_wait_ms, s.max_queue) == (8, 2.0, 64)
    assert (s.max_body_bytes, s.max_pixels, s.max_files) == (20 * 1024 * 1024, 40_000_000, 16)
    assert s.api_keys == () and s.cors_origins == () and s.log_level == "info"
    assert s.warnings() == [] and not s.default_model_explicit
    assert s.archive_dir is None and (s.archive_passed_every, s.archive_max_files) == (0, 10_000)


def test_an_empty_archive_dir_means_no_archive_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOSCOPE_ARCHIVE_DIR", " ")
    assert load_settings().archive_dir is None
    monkeypatch.setenv("ANOSCOPE_ARCHIVE_DIR", str(tmp_path / "archive"))
    monkeypatch.setenv("ANOSCOPE_ARCHIVE_PASSED_EVERY", "100")
    s = load_settings()
    assert s.archive_dir == tmp_path / "archive" and s.archive_passed_every == 100


def test_environment_variables_with_comma_separated_lists(monkeypatch):
    monkeypatch.setenv("ANOSCOPE_PROVIDERS", "CPU")
    monkeypatch.setenv("ANOSCOPE_API_KEYS", f"{KEY}, {KEY}-two")
    monkeypatch.setenv("ANOSCOPE_CORS_ORIGINS", "http://a.local,http://b.local")
    monkeypatch.setenv("ANOSCOPE_MAX_BATCH_WAIT_MS", "0")
    monkeypatch.setenv("ANOSCOPE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("ANOSCOPE_DEFAULT_MODEL", "line3")
    s = load_settings()
    assert s.providers == ("cpu",)
    assert [k.get_secret_value() for k in s.api_keys] == [KEY, f"{KEY}-two"]
    assert s.cors_origins == ("http://a.local", "http://b.local")
    assert s.max_batch_wait_ms == 0 and s.log_level == "debug"
    assert s.default_model == "line3" and s.default_model_explicit


def test_a_settings_file_is_read_and_the_environment_wins(monkeypatch, tmp_path):
    path = tmp_path / "anoscope.env"
    path.write_text("# factory box 7\nANOSCOPE_PORT=9100\nANOSCOPE_MAX_FILES=4\nOTHER_TOOL=1\n")
    monkeypatch.setenv("ANOSCOPE_SETTINGS_FILE", str(path))
    monkeypatch.setenv("ANOSCOPE_PORT", "9200")
    s = load_settings()
    assert (s.port, s.max_files) == (9200, 4)
    assert load_settings(port=9300).port == 9300  # code (the CLI flags) wins over both


def test_dot_env_in_the_working_directory_is_read(tmp_path):
    (tmp_path / ".env").write_text("ANOSCOPE_MAX_QUEUE=99\n")
    assert load_settings().max_queue == 99


def test_a_missing_settings_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOSCOPE_SETTINGS_FILE", str(tmp_path / "nope.env"))
    with pytest.raises(FileNotFoundError, match="ANOSCOPE_SETTINGS_FILE points at .*nope.env, which is not a file"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ANOSCOPE_MAX_BATCH_SIZE": "0"}, "greater than or equal to 1"),
        ({"ANOSCOPE_MAX_QUEUE": "0"}, "greater than or equal to 1"),
        ({"ANOSCOPE_MAX_BODY_BYTES": "0"}, "greater than or equal to 1"),
        ({"ANOSCOPE_MAX_PIXELS": "-5"}, "greater than or equal to 1"),
        ({"ANOSCOPE_MAX_FILES": "0"}, "greater than or equal to 1"),
        ({"ANOSCOPE_MAX_BATCH_WAIT_MS": "-1"}, "greater than or equal to 0"),
        ({"ANOSCOPE_PORT": "70000"}, "less than or equal to 65535"),
        ({"ANOSCOPE_INTRA_OP_THREADS": "0"}, "greater than or equal to 1"),
        ({"ANOSCOPE_PROVIDERS": "gpu,cpu"}, "must be a non-empty list drawn from tensorrt, cuda, cpu"),
        ({"ANOSCOPE_API_KEYS": "secret"}, "API key #1 is too weak"),
        ({"ANOSCOPE_MAX_FILES": "32", "ANOSCOPE_MAX_QUEUE": "16"}, "max_queue (16) is smaller than max_files (32)"),
        ({"ANOSCOPE_CORS_ORIGINS": "*,http://a.local"}, "mixes '*' with named origins"),
        ({"ANOSCOPE_LOG_LEVEL": "loud"}, "Input should be"),
    ],
)
def test_dangerous_or_impossible_settings_are_refused_at_start_up(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        load_settings()


def test_a_rejected_key_is_not_echoed_in_the_error(monkeypatch):
    monkeypatch.setenv("ANOSCOPE_API_KEYS", f"{KEY},weak-but-secret")
    with pytest.raises(ValidationError) as err:
        load_settings()
    assert "weak-but-secret" not in str(err.value) and KEY not in str(err.value)
    assert "API key #2 is too weak" in str(err.value)


def test_binding_all_interfaces_without_keys_warns_loudly_but_starts(make_client, caplog):
    s = Settings(_env_file=None, host="0.0.0.0")
    (warning,) = s.warnings()
    assert warning.startswith("the service binds 0.0.0.0 without API keys: anyone who can reach this port can use it")
    assert Settings(_env_file=None, host="0.0.0.0", api_keys=KEY).warnings() == []
    caplog.set_level(logging.WARNING)
    client = make_client(host="0.0.0.0")
    assert client.get("/readyz").status_code == 200
    assert "binds 0.0.0.0 without API keys" in caplog.text


def test_misspelt_variables_are_reported(monkeypatch, tmp_path, make_client, caplog):
    monkeypatch.setenv("ANOSCOPE_MAX_QEUE", "5")
    (tmp_path / ".env").write_text("ANOSCOPE_API_KEY=x\nANOSCOPE_PORT=8001\n")
    assert unknown_names(tmp_path / ".env") == ["ANOSCOPE_API_KEY", "ANOSCOPE_MAX_QEUE"]
    caplog.set_level(logging.WARNING)
    make_client()
    assert "ANOSCOPE_MAX_QEUE matches no setting and is ignored; check its spelling" in caplog.text


def test_get_settings_is_cached_and_can_be_cleared(monkeypatch):
    get_settings.cache_clear()
    try:
        first = get_settings()
        assert get_settings() is first
        monkeypatch.setenv("ANOSCOPE_PORT", "8123")
        assert get_settings().port == 8000
        get_settings.cache_clear()
        assert get_settings().port == 8123
    finally:
        get_settings.cache_clear()


def test_settings_are_immutable_so_limits_cannot_change_at_run_time():
    s = load_settings()
    with pytest.raises(ValidationError):
        s.max_pixels = 10**12  # type: ignore[misc]


def test_every_setting_is_in_the_api_docs_settings_table() -> None:
    """An operator reads docs/api.md, not settings.py: a setting missing from its table is one nobody finds."""
    import re
    from pathlib import Path

    from service.settings import Settings

    page = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    table = page[page.index("## Settings") :].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(ANOSCOPE_[A-Z0-9_]+)` \|", table, flags=re.MULTILINE))
    assert documented == {f"ANOSCOPE_{name.upper()}" for name in Settings.model_fields}
