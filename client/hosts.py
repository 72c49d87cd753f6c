"""Which hosts the client downloads from and uploads to (presigned URLs from the worker).

A URL in a response is followed only when it is ``http(s)`` and its host is one of:

* the endpoint's own host (``--local``'s host: its S3 or moto server often runs beside it);
* AWS S3 (``s3.amazonaws.com``, ``<bucket>.s3.<region>.amazonaws.com``): the worker's
  storage when ``S3_ENDPOINT_URL`` is not set;
* a host the caller allows: ``allowed_hosts=[...]``, ``--allow-host HOST`` or
  ``LORA_WORKER_ALLOW_HOSTS`` (comma-separated): the host of the worker's ``S3_ENDPOINT_URL``
  (R2, MinIO, ...). A leading dot allows every subdomain (``.r2.cloudflarestorage.com``).

Hosts are compared by name, without the port. Anything else (a metadata address, a host on
the caller's network) is refused before any connection is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOW_HOSTS_ENV = "LORA_WORKER_ALLOW_HOSTS"
AWS_S3 = re.compile(r"^([a-z0-9.-]+\.)?s3([.-][a-z0-9-]+)*\.amazonaws\.com$")
WEB_SCHEMES = ("http", "https")


def host_of(url: str) -> str:
    """The lower-case host name of ``url`` (``""`` when it has none)."""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _entry(value: str) -> str:
    value = value.strip().lower()
    return host_of(value) if "://" in value else value.rstrip(".")


def env_hosts() -> list[str]:
    """The hosts of ``LORA_WORKER_ALLOW_HOSTS``."""
    return [part for part in os.environ.get("LORA_WORKER_ALLOW_HOSTS", "").split(",") if part.strip()]


@dataclass(frozen=True)
class HostPolicy:
    """The hosts URLs from responses may point at; see the module's docstring."""

    hosts: frozenset[str]
    suffixes: tuple[str, ...] = ()
    aws_s3: bool = True

    @classmethod
    def build(cls, allowed: Iterable[str] = (), *, endpoint_url: str = "", aws_s3: bool = True) -> HostPolicy:
        """The endpoint's host, AWS S3 (``aws_s3``), and ``allowed`` (names, ``.suffix``es or URLs)."""
        entries = [_entry(item) for item in allowed if item.strip()]
        hosts = {item for item in entries if item and not item.startswith(".")}
        if endpoint_url and host_of(endpoint_url):
            hosts.add(host_of(endpoint_url))
        suffixes = tuple(item for item in entries if item.startswith(".") and len(item) > 1)
        return cls(frozenset(hosts), suffixes, aws_s3)

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if not host:
            return False
        if host in self.hosts or any(host.endswith(suffix) for suffix in self.suffixes):
            return True
        return self.aws_s3 and bool(AWS_S3.fullmatch(host))

    def problem(self, url: str) -> str | None:
        """Why ``url`` must not be followed, or ``None``."""
        scheme = urlsplit(url).scheme.lower()
        if scheme not in WEB_SCHEMES:
            return f"unsupported URL scheme {scheme!r} (only http and https)"
        host = host_of(url)
        if not self.allows(host):
            return (
                f"host {host!r} is not the endpoint's, AWS S3, nor an allowed host; if it is your "
                f"storage, pass --allow-host {host} (or {ALLOW_HOSTS_ENV}={host}, allowed_hosts=[...])"
            )
        return None
