"""Throwaway TLS certificates for ``psfw bench``'s TLS variants: a CA and a shard
certificate for 127.0.0.1 (or the shard hosts' addresses), made with the ``openssl``
command, valid for a day."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class BenchCerts(NamedTuple):
    ca: Path
    cert: Path
    key: Path


def openssl_installed() -> bool:
    return shutil.which("openssl") is not None


def make_certs(folder: Path, addresses: Sequence[str] = ("127.0.0.1",)) -> BenchCerts:
    """A CA (``ca.pem``) and a shard certificate signed by it (``shard.pem``,
    ``shard.key``) for the IP ``addresses`` (every shard's: one certificate serves
    them all), in ``folder``."""

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=psfw-bench-ca")
    openssl("req", *EC_KEY, "-keyout", "shard.key", "-out", "shard.csr", "-subj", f"/CN={addresses[0]}")
    (folder / "san.ext").write_text("subjectAltName=" + ",".join(f"IP:{a}" for a in addresses) + "\n")
    openssl(
        "x509", "-req", "-in", "shard.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "shard.pem", "-days", "1", "-extfile", "san.ext",
    )  # fmt: skip
    return BenchCerts(folder / "ca.pem", folder / "shard.pem", folder / "shard.key")


__all__ = ["BenchCerts", "make_certs", "openssl_installed"]
