"""Settings: read from MONETA_* once; a bad value stops the process with one
line naming the variable."""

from __future__ import annotations

import os

import pytest

from services.common.config import CommonSettings, load_settings
from services.ledger.config import LedgerSettings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the MONETA_* variables it sets itself."""
    for name in list(os.environ):
        if name.upper().startswith("MONETA_"):
            monkeypatch.delenv(name)


def test_defaults_point_at_local_infrastructure() -> None:
    settings = CommonSettings()
    assert (settings.postgres_url, settings.amqp_url, settings.redis_url) == (
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "amqp://guest:guest@127.0.0.1:5672/",
        "redis://127.0.0.1:6379/0",
    )


def test_defaults_for_prefixes_and_logging() -> None:
    settings = CommonSettings()
    assert (
        settings.db_prefix,
        settings.redis_prefix,
        settings.amqp_exchange,
        settings.log_level,
        settings.log_format,
    ) == ("moneta_", "moneta:", "moneta.events", "INFO", "json")


def test_ledger_defaults_to_its_own_ports() -> None:
    settings = LedgerSettings()
    assert (settings.ledger_port, settings.ledger_metrics_port) == (50051, 9101)


def test_environment_variable_overrides_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONETA_LEDGER_PORT", "6000")
    assert LedgerSettings().ledger_port == 6000


def test_settings_are_frozen() -> None:
    settings = CommonSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.db_prefix = "other_"


def test_database_url_names_the_service_database() -> None:
    assert CommonSettings().database_url("ledger") == (
        "postgresql://postgres@127.0.0.1:5432/moneta_ledger"
    )


def test_database_url_honours_the_db_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONETA_DB_PREFIX", "moneta_test_42_")
    assert CommonSettings().database_url("wallet") == (
        "postgresql://postgres@127.0.0.1:5432/moneta_test_42_wallet"
    )


def test_database_url_keeps_credentials_host_and_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "MONETA_POSTGRES_URL", "postgres://app:pw@db.internal:6543/main?sslmode=require"
    )
    assert CommonSettings().database_url("ledger") == (
        "postgres://app:pw@db.internal:6543/moneta_ledger?sslmode=require"
    )


def test_load_settings_returns_the_settings_when_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONETA_LEDGER_PORT", "6001")
    assert load_settings(LedgerSettings, "moneta-ledger").ledger_port == 6001


@pytest.mark.parametrize(
    "url", ["mysql://root@127.0.0.1/db", "not a url", "postgresql://", "127.0.0.1:5432"]
)
def test_malformed_postgres_url_exits_with_code_2(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("MONETA_POSTGRES_URL", url)
    with pytest.raises(SystemExit) as caught:
        load_settings(CommonSettings, "moneta-ledger")
    assert caught.value.code == 2


def test_malformed_postgres_url_writes_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MONETA_POSTGRES_URL", "mysql://root@127.0.0.1/db")
    with pytest.raises(SystemExit):
        load_settings(CommonSettings, "moneta-ledger")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("moneta-ledger: invalid setting MONETA_POSTGRES_URL: ")


def test_invalid_setting_line_does_not_echo_the_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MONETA_POSTGRES_URL", "mysql://root:s3cret-pw@127.0.0.1/db")
    with pytest.raises(SystemExit):
        load_settings(CommonSettings, "moneta-ledger")
    assert "s3cret-pw" not in capsys.readouterr().err


def test_non_integer_port_exits_with_code_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONETA_LEDGER_PORT", "abc")
    with pytest.raises(SystemExit) as caught:
        load_settings(LedgerSettings, "moneta-ledger")
    assert caught.value.code == 2


def test_non_integer_port_writes_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MONETA_LEDGER_PORT", "abc")
    with pytest.raises(SystemExit):
        load_settings(LedgerSettings, "moneta-ledger")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("moneta-ledger: invalid setting MONETA_LEDGER_PORT: ")


def test_unknown_log_level_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MONETA_LOG_LEVEL", "LOUD")
    with pytest.raises(SystemExit):
        load_settings(CommonSettings, "moneta-ledger")
    assert "MONETA_LOG_LEVEL" in capsys.readouterr().err
