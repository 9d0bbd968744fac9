"""
Docker labels (pure): C{pipegate.EXPOSE}, C{pipegate.UNEXPOSE} and C{pipegate.EXCLUDE}.

The C{hypergate.*} spellings are accepted too, and for each label the C{pipegate.*} one
wins when both are set (see L{LABEL_PREFIXES}); label keys are matched exactly.  A
label with an invalid item is an error (L{DockerLabelError}): the container is skipped
and reported by L{pipegate.ports.docker.containers.discover}, instead of the item being
silently dropped (Hypergate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from pipegate.ports.services import PROTOCOLS

__all__ = [
    "LABEL_PREFIXES",
    "DockerLabelError",
    "UnexposeSpec",
    "find_label",
    "parse_expose_label",
    "parse_unexpose_label",
]

LABEL_PREFIXES = ("pipegate.", "hypergate.")

_PORT_RE = re.compile(r"[0-9]{1,5}")
_ITEM_CHARS = 40


class DockerLabelError(ValueError):
    """A C{pipegate.*}/C{hypergate.*} label cannot be parsed; the message is one line naming the bad item."""


@attrs.frozen
class UnexposeSpec:
    """
    What a C{UNEXPOSE} label removes: every unpublished port (C{all_ports}, from C{*}),
    or the listed C{(port, protocol)} pairs.
    """

    all_ports: bool = False
    ports: frozenset[tuple[int, str]] = attrs.field(default=frozenset(), converter=frozenset)

    def removes(self, port: int, protocol: str) -> bool:
        return self.all_ports or (port, protocol) in self.ports


def _item_text(item: str) -> str:
    text = repr(item)
    return text if len(text) <= _ITEM_CHARS else text[: _ITEM_CHARS - 3] + "..."


def _label_port(text: str, item: str, what: str) -> int:
    text = text.strip()
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise DockerLabelError(f"bad item {_item_text(item)}: {what} must be an integer 1-65535")
    return int(text)


def _label_protocol(text: str, item: str) -> str:
    protocol = text.strip().lower()
    if protocol not in PROTOCOLS:
        raise DockerLabelError(f'bad item {_item_text(item)}: protocol must be "tcp" or "udp"')
    return protocol


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_expose_label(text: str) -> list[tuple[int, int | None, str]]:
    """
    C{"port[:public][/proto],..."} -> C{[(port, public or None, proto), ...]}, in order.

    C{port} is the container's (private) port and C{public} the gate port announced for
    it, in Hypergate's order (the reverse of C{docker run -p}): C{9000:19000/udp} is
    container port 9000, gate port 19000, udp.  The protocol is C{tcp} or C{udp} in any
    case, C{tcp} when missing.  Spaces around items and parts are ignored, and so are
    empty items (C{"80,"}).  Any other bad item raises L{DockerLabelError} naming it.
    """
    result: list[tuple[int, int | None, str]] = []
    for item in _items(text):
        ports, slash, protocol = item.partition("/")
        proto = _label_protocol(protocol, item) if slash else "tcp"
        private, colon, public = ports.partition(":")
        result.append((
            _label_port(private, item, "port"),
            _label_port(public, item, "public port") if colon else None,
            proto,
        ))
    return result


def parse_unexpose_label(text: str) -> UnexposeSpec:
    """
    C{"*"} or C{"port[/proto],..."} -> L{UnexposeSpec}.

    C{*} removes every unpublished port.  C{port/proto} removes that one port; a bare
    C{port} means C{port/tcp}, as in C{EXPOSE} labels and in a Dockerfile's C{EXPOSE}
    (Hypergate: "C{p/proto} or C{p} removes one"), so C{UNEXPOSE=53} leaves C{53/udp}
    alone.  Published ports (with a C{PublicPort} from Docker) are never removed; see
    L{container_services}.  A bad item raises L{DockerLabelError} naming it.
    """
    all_ports = False
    ports: set[tuple[int, str]] = set()
    for item in _items(text):
        if item == "*":
            all_ports = True
            continue
        port, slash, protocol = item.partition("/")
        proto = _label_protocol(protocol, item) if slash else "tcp"
        ports.add((_label_port(port, item, "port"), proto))
    return UnexposeSpec(all_ports, frozenset(ports))


def find_label(labels: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """
    C{(key, value)} of label C{name} (C{"EXPOSE"}, ...) under the first of
    L{LABEL_PREFIXES} that is set, or C{None}.  Keys are matched exactly.
    """
    for prefix in LABEL_PREFIXES:
        key = prefix + name
        value = labels.get(key)
        if isinstance(value, str):
            return key, value
    return None

