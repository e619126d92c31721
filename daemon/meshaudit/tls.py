"""TLS facts the rules need: protocol versions in order, and the IANA cipher-suite codes Envoy
logs (``tls_cipher_suite``, ``%DOWNSTREAM_TLS_CIPHER%``) with their names.

The table holds the suites that matter in a mesh: the TLS 1.3 suites, the TLS 1.2 ECDHE, DHE and
RSA key-exchange suites with AES-GCM, AES-CBC and CHACHA20-POLY1305, and the legacy 3DES, RC4 and
NULL suites an old or misconfigured peer may still offer. Each suite has its IANA name
(``TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256``) and, where one exists, its OpenSSL/BoringSSL name,
the spelling Envoy's ``cipher_suites`` and ``%DOWNSTREAM_TLS_CIPHER%`` use
(``ECDHE-RSA-AES128-GCM-SHA256``; TLS 1.3 suites have only the IANA name). A code outside the
table is still shown, as ``0x....``.
"""

from __future__ import annotations

from typing import Final

# Protocol versions as Hop.tls_version spells them, oldest first.
VERSIONS: Final = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
VERSION_RANK: Final = {v: i for i, v in enumerate(VERSIONS)}

# IANA code -> (IANA name, OpenSSL name or None)
SUITES: Final[dict[int, tuple[str, str | None]]] = {
    # TLS 1.3 (RFC 8446): the only suites a TLS 1.3 connection can use
    0x1301: ("TLS_AES_128_GCM_SHA256", None),
    0x1302: ("TLS_AES_256_GCM_SHA384", None),
    0x1303: ("TLS_CHACHA20_POLY1305_SHA256", None),
    0x1304: ("TLS_AES_128_CCM_SHA256", None),
    0x1305: ("TLS_AES_128_CCM_8_SHA256", None),
    # TLS 1.2 ECDHE with AEAD (forward secret, authenticated encryption)
    0xC02B: ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    0xC02C: ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    0xC02F: ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
    0xC030: ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384"),
    0xCCA8: ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-RSA-CHACHA20-POLY1305"),
    0xCCA9: ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    0xCCAC: ("TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256", "ECDHE-PSK-CHACHA20-POLY1305"),
    # TLS 1.2 ECDHE with CBC (MAC-then-encrypt: Lucky13-style padding oracles)
    0xC009: ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", "ECDHE-ECDSA-AES128-SHA"),
    0xC00A: ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", "ECDHE-ECDSA-AES256-SHA"),
    0xC013: ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES128-SHA"),
    0xC014: ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "ECDHE-RSA-AES256-SHA"),
    0xC023: ("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "ECDHE-ECDSA-AES128-SHA256"),
    0xC024: ("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", "ECDHE-ECDSA-AES256-SHA384"),
    0xC027: ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "ECDHE-RSA-AES128-SHA256"),
    0xC028: ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", "ECDHE-RSA-AES256-SHA384"),
    0xC035: ("TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA", "ECDHE-PSK-AES128-CBC-SHA"),
    0xC036: ("TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA", "ECDHE-PSK-AES256-CBC-SHA"),
    # TLS 1.2 DHE
    0x009E: ("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE-RSA-AES128-GCM-SHA256"),
    0x009F: ("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE-RSA-AES256-GCM-SHA384"),
    0x0033: ("TLS_DHE_RSA_WITH_AES_128_CBC_SHA", "DHE-RSA-AES128-SHA"),
    0x0039: ("TLS_DHE_RSA_WITH_AES_256_CBC_SHA", "DHE-RSA-AES256-SHA"),
    # RSA key exchange (no forward secrecy)
    0x009C: ("TLS_RSA_WITH_AES_128_GCM_SHA256", "AES128-GCM-SHA256"),
    0x009D: ("TLS_RSA_WITH_AES_256_GCM_SHA384", "AES256-GCM-SHA384"),
    0x002F: ("TLS_RSA_WITH_AES_128_CBC_SHA", "AES128-SHA"),
    0x0035: ("TLS_RSA_WITH_AES_256_CBC_SHA", "AES256-SHA"),
    0x003C: ("TLS_RSA_WITH_AES_128_CBC_SHA256", "AES128-SHA256"),
    0x003D: ("TLS_RSA_WITH_AES_256_CBC_SHA256", "AES256-SHA256"),
    0x008C: ("TLS_PSK_WITH_AES_128_CBC_SHA", "PSK-AES128-CBC-SHA"),
    0x008D: ("TLS_PSK_WITH_AES_256_CBC_SHA", "PSK-AES256-CBC-SHA"),
    # Legacy: 3DES (Sweet32), RC4 (broken), NULL (no encryption at all)
    0x000A: ("TLS_RSA_WITH_3DES_EDE_CBC_SHA", "DES-CBC3-SHA"),
    0xC012: ("TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA", "ECDHE-RSA-DES-CBC3-SHA"),
    0x0004: ("TLS_RSA_WITH_RC4_128_MD5", "RC4-MD5"),
    0x0005: ("TLS_RSA_WITH_RC4_128_SHA", "RC4-SHA"),
    0xC007: ("TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", "ECDHE-ECDSA-RC4-SHA"),
    0xC011: ("TLS_ECDHE_RSA_WITH_RC4_128_SHA", "ECDHE-RSA-RC4-SHA"),
    0x0001: ("TLS_RSA_WITH_NULL_MD5", "NULL-MD5"),
    0x0002: ("TLS_RSA_WITH_NULL_SHA", "NULL-SHA"),
    0x003B: ("TLS_RSA_WITH_NULL_SHA256", "NULL-SHA256"),
    0xC006: ("TLS_ECDHE_ECDSA_WITH_NULL_SHA", "ECDHE-ECDSA-NULL-SHA"),
    0xC010: ("TLS_ECDHE_RSA_WITH_NULL_SHA", "ECDHE-RSA-NULL-SHA"),
}

# Every TLS 1.3 suite: a TLS 1.3 connection can use no other.
TLS13_SUITES: Final = frozenset(c for c in SUITES if 0x1301 <= c <= 0x1305)
# The TLS 1.3 suites Envoy (BoringSSL) implements, hence the only ones an Envoy-logged TLS 1.3
# connection can carry.
ENVOY_TLS13_SUITES: Final = frozenset((0x1301, 0x1302, 0x1303))

# Any spelling (IANA or OpenSSL name, upper case) -> code
_BY_NAME: Final = {n.upper(): c for c, names in SUITES.items() for n in names if n}

# weak_tls's default: the TLS 1.3 suites Envoy negotiates and the TLS 1.2 ECDHE AEAD suites
# (AES-GCM and CHACHA20-POLY1305), i.e. what Envoy offers by default minus nothing weaker.
DEFAULT_ALLOWED: Final = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


def cipher_code(spec: str | int) -> int:
    """A cipher suite given by IANA name, OpenSSL name, or code (an int, ``"0xC02F"`` or
    ``"49199"``) -> its IANA code. Raises ValueError naming what it could not read."""
    if isinstance(spec, bool):
        raise ValueError(f"not a cipher suite: {spec!r}")
    if isinstance(spec, int):
        code = spec
    else:
        s = spec.strip()
        found = _BY_NAME.get(s.upper())
        if found is not None:
            return found
        try:
            code = int(s, 0)
        except ValueError:
            raise ValueError(
                f"unknown cipher suite {spec!r}: give an IANA name (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256), "
                "an OpenSSL name (ECDHE-RSA-AES128-GCM-SHA256) or a code (0xC02F)"
            ) from None
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"cipher suite code out of range (0 to 0xFFFF): {spec!r}")
    return code


def cipher_name(code: int) -> str:
    """``ECDHE-RSA-AES128-SHA (TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, 0xC013)``; for TLS 1.3 suites
    ``TLS_AES_128_GCM_SHA256 (0x1301)``; a code outside the table ``unknown suite 0x1234``."""
    names = SUITES.get(code)
    if names is None:
        return f"unknown suite 0x{code:04X}"
    iana, openssl = names
    return f"{openssl} ({iana}, 0x{code:04X})" if openssl else f"{iana} (0x{code:04X})"


def cipher_code_of_name(name: str | None) -> int | None:
    """The code of a logged cipher name (``%DOWNSTREAM_TLS_CIPHER%``), None when unknown."""
    return _BY_NAME.get(name.upper()) if name else None
