"""Sink configuration: strict keys with file and line in the error, secrets only by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshaudit.config import ConfigError
from meshaudit.loading import load
from meshaudit.sinks import build_sinks
from meshaudit.sinks.base import FatalSinkError
from meshaudit.sinks.secrets import read_secret


@pytest.mark.parametrize(
    ("section", "typo"),
    [("kafka", "bootstrap_server"), ("mqtt", "topic_prefx"), ("jsonl", "spool_max_byte")],
)
def test_a_typo_in_a_sink_section_names_the_key_file_and_line(tmp_path: Path, section: str, typo: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(f"sinks:\n  {section}:\n    {typo}: 1\n")
    with pytest.raises(ConfigError, match=rf"c.yaml:3: unknown key 'sinks.{section}.{typo}'"):
        load(f)


def test_a_password_cannot_be_written_in_the_config(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("sinks:\n  kafka:\n    sasl: {username: u, password: hunter2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sinks\.kafka\.sasl\.password'"):
        load(f)
    f.write_text("sinks:\n  kafka:\n    sasl: {username: u}\n")
    with pytest.raises(ConfigError, match="exactly one of password_file or password_env"):
        load(f)


@pytest.mark.parametrize("section", ["kafka", "mqtt"])
def test_a_client_key_without_its_certificate_is_a_config_error(tmp_path: Path, section: str) -> None:
    # Without cert_file no client certificate is sent: mutual TLS would be off without a word.
    f = tmp_path / "c.yaml"
    f.write_text(f"sinks:\n  {section}:\n    tls: {{ca_file: ca.pem, key_file: client-key.pem}}\n")
    with pytest.raises(ConfigError, match="key_file and key_password_\\* need cert_file"):
        load(f)
    f.write_text(f"sinks:\n  {section}:\n    tls: {{cert_file: c.pem, key_password_file: p, key_password_env: P}}\n")
    with pytest.raises(ConfigError, match="set key_password_file or key_password_env, not both"):
        load(f)


def test_build_sinks_builds_the_enabled_sections_in_registry_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("sinks:\n  mqtt: {port: 1884}\n  kafka: {enabled: false}\n")
    cfg, _ = load(f)
    assert [s.name for s in build_sinks(cfg.sinks)] == ["jsonl", "mqtt"]


def test_secrets_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert read_secret("password", str(secret), None) == "s3cret"
    monkeypatch.setenv("MESHAUDIT_TEST_PW", "from-env")
    assert read_secret("password", None, "MESHAUDIT_TEST_PW") == "from-env"
    with pytest.raises(FatalSinkError, match="environment variable MESHAUDIT_TEST_NOPE is not set"):
        read_secret("password", None, "MESHAUDIT_TEST_NOPE")
    with pytest.raises(FatalSinkError, match=r"password_file .*cannot read"):
        read_secret("password", str(tmp_path / "missing"), None)
