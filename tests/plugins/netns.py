"""Several "hosts" on this machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own loopback and one veth leg on a bridge in the
root namespace, which plays the database host (PostgreSQL and Redis are reached there, at the
bridge's address, never at a loopback another host could not see).  Processes started on a
host also get their own UTS namespace and host name, so their heartbeat names read like
separate machines.  Everything is removed on close, also after a failed test.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Lab:
    """A bridge `br` at `<prefix>.1` and hosts at `<prefix>.2`, `.3`, ..."""

    tag: str = field(default_factory=lambda: f"xt{os.getpid() % 100000}")
    prefix: str = field(default_factory=lambda: f"10.213.{os.getpid() % 250}")
    hosts: dict[str, str] = field(default_factory=dict)  # host name -> address
    _namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: where the database host's services listen."""
        return f"{self.prefix}.1"

    def __enter__(self) -> Lab:
        self.close()  # leftovers of a run of the same pid that was killed
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add_host(self, host: str) -> str:
        """A namespace on the bridge; returns its address."""
        ns, index = self.namespace(host), len(self.hosts) + 2
        outside, inside = f"{self.tag}v{index}a", f"{self.tag}v{index}b"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", inside, "netns", ns)
        address = f"{self.prefix}.{index}"
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[host] = address
        return address

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run on `host`: in its network namespace, under its own host name."""
        return [
            "ip", "netns", "exec", self.namespace(host),
            "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv,
        ]  # fmt: skip

    def namespace_of(self, pid: int) -> str:
        result = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=30)
        return result.stdout.strip()

    def close(self) -> None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(f"{self.tag}-"):
                subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, timeout=30)
        self.hosts.clear()
