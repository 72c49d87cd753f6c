"""The one URL input type (:data:`Url`) and the checks that need no network.

Every URL a job may carry (``files[].url``, ``dataset_url``, ``lora_url``) is a :data:`Url`;
:mod:`services.ingest.fetch` repeats :func:`check_url_syntax` on every redirect hop and adds the
checks that need DNS (public addresses only).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator
from yarl import URL

# Not 2048: a presigned S3 URL made with temporary credentials carries the session token in its
# query string and runs to a few thousand characters; callers hand us exactly such URLs.
MAX_URL_LENGTH = 8192
MAX_HOST_LENGTH = 253  # RFC 1035, without the trailing dot
MAX_LABEL_LENGTH = 63
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$", re.IGNORECASE)
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]*))*$", re.IGNORECASE)


def check_url_syntax(url: str) -> str:
    """Check what can be checked without DNS; return ``url`` unchanged or raise ``ValueError``.

    Usable as a pydantic validator: http(s) only, a host, no credentials, no whitespace or
    control characters, no backslash, no legacy numeric host forms (``2130706433``, ``127.1``).
    """
    if not isinstance(url, str) or not url:
        raise ValueError("must be a non-empty http(s) URL")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"URL is {len(url)} characters, over the {MAX_URL_LENGTH}-character limit")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise ValueError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"only http and https URLs are accepted, not {scheme or 'a relative URL'}")
    if "@" in parts.netloc:
        raise ValueError("URL must not carry credentials (user:password@)")
    if "\\" in parts.netloc:
        raise ValueError("URL host must not contain a backslash")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    if port == 0:
        raise ValueError("URL port must be between 1 and 65535")
    if _NUMERIC_HOST.match(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"numeric host {host!r} is not a dotted-quad IPv4 address") from None
    elif not _is_ip(host):
        _check_host_name(url, host)
    return url


def _check_host_name(url: str, host: str) -> None:
    """Refuse a host name that DNS could not carry, in the ASCII form the request would use.

    Without this, ``a..b`` or an overlong label fails deep in the IDNA codec (``UnicodeError``).
    """
    try:
        ascii_host = URL(url).raw_host or ""  # IDNA-encoded, as aiohttp will send it
    except ValueError:  # UnicodeError included
        raise ValueError(f"host {host!r} is not a valid internationalized host name") from None
    name = ascii_host.removesuffix(".")
    if len(name) > MAX_HOST_LENGTH:
        raise ValueError(f"host name is {len(name)} characters, over the {MAX_HOST_LENGTH}-character limit")
    for label in name.split("."):
        if not label:
            raise ValueError(f"host {host!r} has an empty label (two dots in a row, or a leading dot)")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"host {host!r} has a label over {MAX_LABEL_LENGTH} characters")
        if not _LABEL.match(label):
            raise ValueError(
                f"host {host!r}: label {label!r} must be letters, digits, '-' or '_', not starting or ending with '-'"
            )
        if label.lower().startswith("xn--"):
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                raise ValueError(f"host {host!r}: label {label!r} is not valid punycode") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


Url = Annotated[str, AfterValidator(check_url_syntax)]
"""An http(s) URL input, checked as far as possible without the network."""
