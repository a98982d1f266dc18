"""An IpConfig for the stand-in's adapters (Linux TUN devices): Linux's own ``ip`` tool, by LUID (= ifindex).

The Windows backend configures adapters through the IP Helper API, which Linux lacks; the tests install
this instead (``wiretun.windows.ipconfig.install``), so the backend's calls by LUID still run.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import uuid
from typing import Any

from wiretun._backend import IPAddress, IPInterface, IPNetwork, Route
from wiretun.errors import NotSupported, WintunError


def _ip(*args: str) -> Any:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise WintunError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout) if args[0] == "-j" and proc.stdout.strip() else None


class LinuxIp:
    def _dev(self, luid: int) -> str:
        return socket.if_indextoname(luid)

    def alias(self, luid: int) -> str:
        return self._dev(luid)

    def guid(self, luid: int) -> uuid.UUID:
        raise NotSupported("the stand-in keeps no GUID")

    def description(self, luid: int) -> str:
        raise NotSupported("the stand-in keeps no description")

    def _link(self, luid: int) -> dict[str, Any]:
        links: list[dict[str, Any]] = _ip("-j", "link", "show", "dev", self._dev(luid))
        return links[0]

    def mtu(self, luid: int) -> int:
        return int(self._link(luid)["mtu"])

    def set_mtu(self, luid: int, value: int) -> None:
        _ip("link", "set", "dev", self._dev(luid), "mtu", str(value))

    def is_up(self, luid: int) -> bool:
        return "UP" in self._link(luid)["flags"]

    def set_up(self, luid: int) -> None:
        _ip("link", "set", "dev", self._dev(luid), "up")

    def add_address(self, luid: int, iface: IPInterface) -> None:
        extra = ["nodad"] if iface.version == 6 else []
        _ip("addr", "add", str(iface), "dev", self._dev(luid), *extra)

    def remove_address(self, luid: int, iface: IPInterface) -> None:
        _ip("addr", "del", str(iface), "dev", self._dev(luid))

    def addresses(self, luid: int) -> list[IPInterface]:
        info: list[dict[str, Any]] = _ip("-j", "addr", "show", "dev", self._dev(luid))
        return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}") for a in info[0].get("addr_info", [])]

    def add_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        extra = (["via", str(gateway)] if gateway else []) + (["metric", str(metric)] if metric is not None else [])
        _ip("route", "add", str(net), "dev", self._dev(luid), *extra)

    def remove_route(self, luid: int, net: IPNetwork, gateway: IPAddress | None, metric: int | None) -> None:
        extra = (["via", str(gateway)] if gateway else []) + (["metric", str(metric)] if metric is not None else [])
        _ip("route", "del", str(net), "dev", self._dev(luid), *extra)

    def routes(self, luid: int) -> list[Route]:
        found: list[Route] = []
        for family in ("-4", "-6"):
            for r in _ip("-j", family, "route", "show", "dev", self._dev(luid)) or []:
                dst = r["dst"]
                if dst == "default":
                    dst = "0.0.0.0/0" if family == "-4" else "::/0"
                net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/{32 if family == '-4' else 128}")
                gw = ipaddress.ip_address(r["gateway"]) if "gateway" in r else None
                found.append(Route(net, gw, int(r.get("metric", 0))))
        return found
