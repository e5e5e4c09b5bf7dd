"""TLS certificates for a Flower deployment, and emulated Raspberry Pis (docs/DEPLOY.md).

    python -m sims.deploy certs certs/ --host 127.0.0.1 --host localhost --host 192.168.1.10

writes ``ca.pem`` (give it to every SuperNode and to the ``flwr`` CLI),
``server.pem`` and ``server.key`` (for the SuperLink, together with ``ca.pem``).
The server certificate names every ``--host`` the SuperNodes use to reach the
SuperLink (its subject alternative names). The CA's private key is never
written: to add a host, make a new set and hand out the new ``ca.pem``.

    python -m sims.deploy emulate-pi /tmp/pi --boards pi-zero-2w,pi-4-1gb,pi-4-1gb --rounds 3

runs a loopback deployment whose SuperNodes are emulated arm64 Pis, each in a
memory cgroup at its board's RAM, and prints what they used (:mod:`sims.pi`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsFiles", "main", "make_certificates"]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a certificate set made by :func:`make_certificates`."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or any(not label or not label.replace("-", "").isalnum() for label in labels):
        raise ValueError(f"hosts must be IP addresses or DNS names, got {host!r}")
    return x509.DNSName(host)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certificates(out_dir: str | Path, hosts: Sequence[str], *, days: int = 365) -> TlsFiles:
    """Make a CA and a server certificate valid for ``hosts``; write them to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``ca.pem``, ``server.pem`` and ``server.key`` (created if
        missing; ``server.key`` is readable by its owner only).
    hosts : sequence of str
        IP addresses and DNS names the SuperLink is reached at.
    days : int, default 365
        Validity of both certificates.
    """
    if isinstance(hosts, str) or not hosts:
        raise ValueError(
            f"hosts must be a non-empty list of IP addresses or DNS names, got {hosts!r}"
        )
    names = [_san(h) for h in hosts]
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise ValueError(f"days must be an int >= 1, got {days!r}")
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedneq deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(out / "ca.pem", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(_pem(ca_cert))
    files.server_cert.write_bytes(_pem(cert))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(files.server_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.deploy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="make ca.pem, server.pem and server.key")
    certs.add_argument("out_dir", type=Path)
    certs.add_argument(
        "--host", action="append", required=True, help="an IP or DNS name of the SuperLink (repeat)"
    )
    certs.add_argument("--days", type=int, default=365)
    pi = sub.add_parser("emulate-pi", help="emulated Raspberry Pis on loopback (sims.pi)")
    pi.add_argument("out_dir", type=Path)
    pi.add_argument(
        "--boards",
        default="pi-zero-2w,pi-4-1gb,pi-4-1gb",
        help="one board per device, comma-separated (pi-zero-2w, pi-4-1gb)",
    )
    pi.add_argument("--config", default="deploy-test")
    pi.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        help="a config override section.key=value (repeat)",
    )
    pi.add_argument("--rounds", type=int, default=3)
    pi.add_argument(
        "--pip",
        action="append",
        default=[],
        help="a further pip requirement for the devices (torchvision==0.25.0)",
    )
    pi.add_argument(
        "--subprocess",
        action="store_true",
        help="Flower's default isolation (a fresh flwr-clientapp per message), not the warm one",
    )
    pi.add_argument(
        "--dynamo", action="store_true", help="keep torch._dynamo (no FEDNEQ_NO_DYNAMO)"
    )
    pi.add_argument(
        "--probe",
        action="store_true",
        help="also time a bare Python, import torch and the ClientApp imports",
    )
    args = p.parse_args(argv)
    if args.command == "emulate-pi":
        from sims.pi.report import main as emulate_main  # qemu, debootstrap: only when asked

        return emulate_main(args)
    files = make_certificates(args.out_dir, args.host, days=args.days)
    print(f"wrote {files.ca_cert}, {files.server_cert}, {files.server_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
