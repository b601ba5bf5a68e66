"""Endpoint addresses: Envoy's ORIGINAL_DST cluster dials IP literals, so host names are resolved here."""

from __future__ import annotations

import ipaddress
import socket


def host_port(addr: str) -> tuple[str, str] | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return host.strip("[]"), port


def resolve(addr: str, every_address: bool = False) -> list[str]:
    """`host:port` as `ip:port` (every address the name has, or the first): at load, at each reload and,
    for `dns:` entries, periodically while running."""
    split = host_port(addr)
    if split is None:
        return []
    host, port = split
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return []
        ips = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        ips = sorted(ips, key=str) if every_address else ips[:1]
    return [f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip in ips]
