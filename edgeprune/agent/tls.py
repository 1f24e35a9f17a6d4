"""TLS between a client and its agent: the agent's certificate, and how a client decides to trust it.

A client trusts an `https://` agent in one of three ways, from its device profile:
- `tls_fingerprint`: the SHA-256 of the agent's certificate (what `agent serve` prints). Before
  anything is sent, the client fetches the certificate, compares it, and from then on accepts
  only that certificate (it becomes the one trust anchor; the host name is not checked, the pin
  is stronger). Works with a self-signed certificate and no CA.
- `tls_ca`: a CA (or the self-signed certificate itself) in a PEM file; the host name is checked.
- neither: the system's CAs, as a browser would.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from edgeprune.errors import EdgepruneError

FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def normalise_fingerprint(text: str) -> str:
    """'AB:CD:…' or 'abcd…' as 64 lower-case hex digits; one line if it is not a SHA-256."""
    hexes = text.replace(":", "").strip().lower()
    if not FINGERPRINT.match(hexes):
        raise EdgepruneError(
            f"tls_fingerprint must be a SHA-256 (64 hex digits, colons allowed), got {text!r}; "
            "`edgeprune agent serve --tls-cert ...` prints it"
        )
    return hexes


def shown(fingerprint: str) -> str:
    return ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)).upper()


def certificate_fingerprint(pem_path: str | Path) -> str:
    """SHA-256 of the first certificate in a PEM file (its DER bytes), as 64 hex digits."""
    text = Path(pem_path).read_text()
    match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    if not match:
        raise EdgepruneError(f"{pem_path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(match.group(0))).hexdigest()


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The agent's context, loaded here so that a bad certificate or key is one line before serving."""
    for what, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise EdgepruneError(f"{what} {path} is not a file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise EdgepruneError(f"cannot use --tls-cert {cert} with --tls-key {key}: {e.reason or e}") from None
    return ctx


def _peer_certificate(url: str, timeout_s: float) -> bytes:
    """The DER certificate an https URL presents, fetched without trusting it (nothing else is sent)."""
    parts = urlsplit(url)
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout_s) as sock:
            with probe.wrap_socket(sock, server_hostname=parts.hostname) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        raise EdgepruneError(
            f"agent {url} is unreachable over TLS ({type(e).__name__}: {e}); is it serving https?"
        ) from None


def pinned_context(url: str, fingerprint: str, timeout_s: float = 10.0) -> ssl.SSLContext:
    """A context that accepts only the certificate whose SHA-256 is `fingerprint`."""
    want = normalise_fingerprint(fingerprint)
    der = _peer_certificate(url, timeout_s)
    got = hashlib.sha256(der).hexdigest()
    if got != want:
        raise EdgepruneError(
            f"agent {url} presented a certificate with SHA-256 {shown(got)}, not the {shown(want)} "
            "pinned in the device profile (tls_fingerprint); if the agent's certificate was replaced, "
            "pin the new one, otherwise someone is in between"
        )
    ctx = ssl.create_default_context(cadata=der)
    ctx.check_hostname = False  # the pinned certificate itself is the identity
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned leaf is a trust anchor by itself
    return ctx


def client_verify(url: str, *, ca: str | None, fingerprint: str | None) -> ssl.SSLContext | bool:
    """What httpx's `verify` is for this agent: the pinned or CA context, or the system CAs."""
    if not url.startswith("https://"):
        if ca or fingerprint:
            raise EdgepruneError(f"tls_ca / tls_fingerprint need an https:// agent URL, got {url}")
        return True
    if fingerprint:
        return pinned_context(url, fingerprint)
    if ca:
        path = Path(ca).expanduser()
        if not path.is_file():
            raise EdgepruneError(f"tls_ca {ca} is not a file; copy the agent's CA or certificate there")
        try:
            return ssl.create_default_context(cafile=str(path))
        except ssl.SSLError as e:
            raise EdgepruneError(f"tls_ca {ca} is not a PEM certificate ({e.reason or e})") from None
    return True
