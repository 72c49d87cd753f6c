"""Which network addresses a URL input may reach: public ones only, cloud metadata never.

An IPv6 address that embeds an IPv4 one (mapped, 6to4, NAT64) is judged by the IPv4 address
it stands for, so ``::ffff:127.0.0.1`` is a loopback address. Used by :mod:`services.ingest.fetch`
before every connection and on the peer actually connected.
"""

from __future__ import annotations

import ipaddress

# Cloud metadata endpoints stay refused even with ``allow_private_urls``: they hand out
# credentials, and no test needs them.
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_problem(ip: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why a connection to ``ip`` is refused (``"a loopback address"``), or None when allowed."""
    ip = embedded_ipv4(ip)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "a non-public address"),
    )
    return next((why for hit, why in checks if hit), None)


def ip_or_none(text: str) -> IPAddress | None:
    """``text`` as an IP address (any IPv6 zone dropped), or None when it is a host name."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def show_address(ip: IPAddress) -> str:
    """``ip`` for a message, with the IPv4 address it stands for when it embeds one."""
    inner = embedded_ipv4(ip)
    return str(ip) if inner == ip else f"{ip} = {inner}"
