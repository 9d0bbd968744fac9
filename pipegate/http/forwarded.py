"""
Who the public caller is when the relay sits behind a proxy it trusts (C{--trusted-proxy}).

Sans-IO: the relay hands in its TCP peer's address and the request's C{X-Forwarded-For} and
C{X-Forwarded-Proto} header lines, and gets back the caller's IP and scheme.  The rules are
in docs/configuration.md, "Behind a proxy".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from pipegate.core.policy import Address, Network, PolicyError, normalize_ip, parse_network

__all__ = ["NOBODY", "TrustedProxies", "parse_trusted_proxies"]


def parse_trusted_proxies(text: str) -> TrustedProxies:
    """
    The networks of a comma-separated list of IP addresses and CIDR networks (IPv4 or IPv6);
    empty text trusts nobody.  Raises L{ValueError} naming the first entry that is neither.
    """
    networks: list[Network] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            network = parse_network(entry) if entry != "*" else None
        except (ValueError, PolicyError):
            network = None
        if network is None:
            raise ValueError(f"{entry!r} is not an IP address or network (a.b.c.d, a.b.c.d/n, IPv6 the same)")
        networks.append(network)
    return TrustedProxies(networks)


@attrs.frozen
class TrustedProxies:
    """A set of networks whose forwarding headers the relay believes."""

    networks: tuple[Network, ...] = attrs.field(default=(), converter=tuple)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: Address) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def trusts_peer(self, peer: str) -> bool:
        """Whether C{peer} (an IP as text; anything else is not trusted) is a trusted proxy."""
        if not self.networks:
            return False
        try:
            return self.trusts(normalize_ip(peer))
        except PolicyError:
            return False

    def caller(self, peer: str, forwarded_for: Iterable[bytes]) -> str:
        """
        The caller's IP for a request from C{peer}: C{peer} itself unless it is trusted;
        else the rightmost C{X-Forwarded-For} entry that is not a trusted proxy.  Walking
        from the right stops at an entry that is not an IP address (the last trusted hop
        is then the caller), and if every entry is trusted the leftmost one is the caller.
        Entries left of the caller are the caller's own claims and never believed.
        """
        if not self.trusts_peer(peer):
            return peer
        entries = [e for line in forwarded_for for e in line.split(b",")]
        caller = peer
        for entry in reversed(entries):
            try:
                address = normalize_ip(entry.decode("ascii"))
            except (UnicodeDecodeError, PolicyError):
                break
            caller = str(address)
            if not self.trusts(address):
                break
        return caller

    def scheme(self, peer: str, seen: bytes, forwarded_proto: Sequence[bytes]) -> bytes:
        """
        The scheme the caller used: C{seen} (what the relay's own listener is), unless
        C{peer} is trusted and sent C{X-Forwarded-Proto}; then that header's last value
        (the one the proxy next to the relay set) when it is C{http} or C{https}.
        """
        if not forwarded_proto or not self.trusts_peer(peer):
            return seen
        last = forwarded_proto[-1].rsplit(b",", 1)[-1].strip().lower()
        return last if last in (b"http", b"https") else seen


NOBODY = TrustedProxies()

