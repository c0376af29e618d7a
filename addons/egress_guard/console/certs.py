"""The console's TLS certificate, issued from the gateway's own CA."""

from __future__ import annotations

import os
import ssl
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

_ANY = ("", "0.0.0.0", "::")


def tls_context(confdir: Path, cert_dir: Path, host: str) -> ssl.SSLContext:
    """A server certificate for the console, signed by the gateway's own CA: every browser
    behind the proxy trusts that CA already, and the CLI finds it in the data directory."""
    from mitmproxy import certs as mitm_certs  # late: only the gateway process needs it

    store = mitm_certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    addresses = {"127.0.0.1", "::1"}
    if host not in _ANY:
        try:
            addresses.add(str(ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ip_address(a)) for a in sorted(addresses)]
    entry = store.get_cert(host if host not in _ANY else "localhost", names)
    key_pem = entry.privatekey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_dir.mkdir(parents=True, exist_ok=True)
    path = cert_dir / "console-tls.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem + entry.cert.to_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(path)
    return context
