"""Options shared by networked sinks: TLS and secrets read from a file or the environment.

A secret never sits in the config file (it would end up in a repository or a ConfigMap):
options come in pairs ``<name>_file`` / ``<name>_env`` and exactly one may be set. Secrets are
read when the sink connects, so a rotated file is picked up at the next reconnect.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from meshaudit.sinks.base import FatalSinkError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret(what: str, file: str | None, env: str | None) -> str | None:
    """The secret from ``file`` (trailing newline removed) or environment variable ``env``."""
    if file and env:
        raise FatalSinkError(f"{what}: set {what}_file or {what}_env, not both")
    if file:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise FatalSinkError(f"{what}_file {file}: cannot read: {exc.strerror or exc}") from None
    if env:
        value = os.environ.get(env)
        if value is None:
            raise FatalSinkError(f"{what}_env: environment variable {env} is not set")
        return value
    return None


class TlsConfig(_Strict):
    """TLS to the broker. Present (even empty: ``tls: {}``) means TLS on, verified against the
    system CAs unless ``ca_file`` is given."""

    ca_file: str | None = Field(None, description="PEM bundle of CAs to trust; null: system CAs.")
    cert_file: str | None = Field(None, description="Client certificate (PEM), for mutual TLS.")
    key_file: str | None = Field(None, description="Client private key (PEM), for mutual TLS.")
    key_password_file: str | None = Field(None, description="File holding the key's password.")
    key_password_env: str | None = Field(None, description="Environment variable holding the key's password.")
    verify_hostname: bool = Field(True, description="Check the broker's name against its certificate.")

    @model_validator(mode="after")
    def _client_certificate(self) -> TlsConfig:
        # Without cert_file no client certificate is sent at all: a key or its password alone
        # would turn mutual TLS off without a word, and the broker's refusal would be the only sign.
        if not self.cert_file and (self.key_file or self.key_password_file or self.key_password_env):
            raise ValueError("key_file and key_password_* need cert_file (the client certificate, for mutual TLS)")
        if self.key_password_file and self.key_password_env:
            raise ValueError("set key_password_file or key_password_env, not both")
        return self

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                password = read_secret("key_password", self.key_password_file, self.key_password_env)
                ctx.load_cert_chain(self.cert_file, self.key_file, password)
        except (OSError, ssl.SSLError) as exc:
            raise FatalSinkError(f"tls: cannot load certificates: {exc}") from None
        ctx.check_hostname = self.verify_hostname
        return ctx
