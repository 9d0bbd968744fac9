"""
The provider chooser: which links serve which route, and which one to try next.

One sans-IO table used by every place that picks a peer for new work: the gateway (a
gate's providers), the hub (a router's providers of a gate) and the relay (a tunnel's
connectors).  A link announces the routes it serves (L{RouteTable.announce}), is
drained when it says GOAWAY (L{RouteTable.drain}: it keeps what it has but gets nothing
new) and leaves when it is lost (L{RouteTable.remove}).

New work on a route takes an L{Attempt} (L{RouteTable.choose}): the links serving the
route, rotated one step further on each call (round robin), tried in turn.  The caller
tries the link L{Attempt.next} returns and, on a refusal or a loss before the answer
(OPEN_FAIL, RESET, a timeout, a lost link), calls L{Attempt.next} again: links that
left or started draining meanwhile are skipped, and C{None} means none is left (give
up).  L{RouteTable.pick} is the one-shot form (no failover): the next link of a route.

Links are any hashable objects (compared by identity as dictionary keys); routes are
any hashable keys.  Nothing here reads a clock or touches I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

import attrs

Key = TypeVar("Key", bound=Hashable)
Link = TypeVar("Link", bound=Hashable)


@attrs.define(eq=False)
class RouteTable(Generic[Key, Link]):
    """
    The routes each link serves, which links are draining, and a round-robin position
    per route.  Links keep the order in which they were first announced.
    """

    _routes: dict[Link, tuple[Key, ...]] = attrs.field(factory=dict, init=False)
    _draining: set[Link] = attrs.field(factory=set, init=False)
    _next: dict[Key, int] = attrs.field(factory=dict, init=False)
    # links() by key, until the table next changes (the relay asks several times per request).
    _links: dict[Key, list[Link]] = attrs.field(factory=dict, init=False)

    # -- what links say
    def announce(self, link: Link, keys: Iterable[Key]) -> None:
        """C{link} serves exactly C{keys} from now on (an empty announcement keeps it known)."""
        self._routes[link] = tuple(dict.fromkeys(keys))
        self._links = {}

    def drain(self, link: Link) -> None:
        """C{link} is going away: it is chosen for nothing new, but stays until L{remove}."""
        self._draining.add(link)
        self._links = {}

    def remove(self, link: Link) -> None:
        """C{link} is gone: forget it and its routes."""
        self._routes.pop(link, None)
        self._draining.discard(link)
        self._links = {}

    # -- questions
    def draining(self, link: Link) -> bool:
        return link in self._draining

    def serves(self, link: Link, key: Key) -> bool:
        """C{link} is known, not draining, and announced C{key}."""
        return link not in self._draining and key in self._routes.get(link, ())

    def links(self, key: Key) -> list[Link]:
        """
        The links serving C{key}, draining ones left out, in announcement order (one list
        kept until the table changes: not to be modified by the caller).
        """
        links = self._links.get(key)
        if links is None:
            links = [link for link, keys in self._routes.items() if key in keys and link not in self._draining]
            if links:   # (so what is kept is bounded by the routes announced)
                self._links[key] = links
        return links

    def table(self) -> dict[Key, list[Link]]:
        """Every route served by a link that is not draining, with its links."""
        out: dict[Key, list[Link]] = {}
        for link, keys in self._routes.items():
            if link in self._draining:
                continue
            for key in keys:
                out.setdefault(key, []).append(link)
        return out

    # -- choosing
    def rotation(self, key: Key) -> list[Link]:
        """The links serving C{key}, starting one further on each call (round robin)."""
        links = self.links(key)
        start = self._next.get(key, 0)
        self._next[key] = start + 1
        if not links:
            return []
        start %= len(links)
        return links[start:] + links[:start]

    def pick(self, key: Key) -> Link | None:
        """The next link for C{key} in round robin, or C{None} when none serves it."""
        links = self.rotation(key)
        return links[0] if links else None

    def choose(self, key: Key, usable: Callable[[Link], bool] | None = None) -> Attempt[Key, Link]:
        """
        The candidates for one piece of new work on C{key}, in round-robin order, to be
        taken one by one with L{Attempt.next}.  C{usable} (optional) is asked about each
        candidate when its turn comes; one it refuses is skipped.
        """
        return Attempt(self, key, self.rotation(key), usable)

    def forget(self, key: Key) -> None:
        """Drop the round-robin position of C{key} (no link serves it any more)."""
        self._next.pop(key, None)


@attrs.define(eq=False)
class Attempt(Generic[Key, Link]):
    """One piece of work looking for a link: the candidates not yet tried, in order."""

    table: RouteTable[Key, Link]
    key: Key
    candidates: list[Link]
    usable: Callable[[Link], bool] | None = None
    tried: int = 0

    def next(self) -> Link | None:
        """
        The next candidate still serving the route (not removed, not draining, usable),
        or C{None} when none is left: the caller gives up.
        """
        while self.candidates:
            link = self.candidates.pop(0)
            if not self.table.serves(link, self.key):
                continue
            if self.usable is not None and not self.usable(link):
                continue
            self.tried += 1
            return link
        return None

    @property
    def exhausted(self) -> bool:
        return not self.candidates
