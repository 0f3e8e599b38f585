"""The server's TLS context: the standard library's ssl, modern defaults."""

from __future__ import annotations

import ssl

from ..config import ConfigError, TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A context for STARTTLS (RFC 3207) from ``[tls]``.

    ``create_default_context`` already disables SSLv3, compression and weak
    ciphers; TLS 1.2 is the floor (RFC 8996 retired 1.0 and 1.1).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[tls]: cannot load certificate {tls.certificate} with key {tls.key}: {exc}"
        ) from exc
    return context


def describe(version: str | None, cipher: tuple[str, str, int] | None) -> str:
    """For Received and the envelope: ``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384``."""
    name = cipher[0] if cipher else "unknown"
    return f"{version or 'TLS'} with cipher {name}"
