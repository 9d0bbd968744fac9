"""
The file-descriptor budget of a service.

At start each service raises its soft C{RLIMIT_NOFILE} to the hard limit (a process may
always do that without privileges), logs the budget, and sizes its default connection and
flow caps from it, keeping headroom for its own listeners, links, log files and the
connections it dials itself.  systemd's default soft limit is 1,024 (hard 524,288);
docs/deployment.md's units set C{LimitNOFILE}.
"""

from __future__ import annotations

import resource

import attrs

#: Descriptors a service keeps for itself whatever its load: listeners, mux links, the
#: metrics and status listeners, log files, DNS, the Docker socket, and what Python holds.
RESERVE = 64


@attrs.frozen
class FdBudget:
    before: int   # the soft limit the process started with
    soft: int     # the soft limit now
    hard: int

    @property
    def raised(self) -> bool:
        return self.soft > self.before

    def usable(self, reserve: int = RESERVE) -> int:
        """Descriptors left for connections and flows once the service's own are kept."""
        return max(0, self.soft - reserve)


def raise_nofile(getrlimit=resource.getrlimit, setrlimit=resource.setrlimit) -> FdBudget:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 1,048,576) and say what it is."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    target = min(target, 1_048_576)
    if soft == resource.RLIM_INFINITY:
        soft = target
    if soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return FdBudget(before=soft, soft=soft, hard=hard)
        return FdBudget(before=soft, soft=target, hard=hard)
    return FdBudget(before=soft, soft=soft, hard=hard)


def default_caps(usable: int, per_unit: int = 1, share: int = 4, per_source_max: int = 256) -> tuple[int, int]:
    """
    Default (per-source, total) caps for one kind of connection or flow.

    @param usable: descriptors available to this kind (L{FdBudget.usable}, or a part of it
        when several kinds share the budget).
    @param per_unit: descriptors one connection or flow costs in this process.
    @param share: one source may hold at most 1/C{share} of the total ...
    @param per_source_max: ... and never more than this many.
    @return: C{(per_source, total)}, each at least 1.
    """
    total = max(1, usable // max(1, per_unit))
    per_source = max(1, min(per_source_max, total // max(1, share)))
    return per_source, total


def pick(value: int | None, default: int) -> int:
    """An option's value, or C{default} when it was left to the fd budget (C{None})."""
    return default if value is None else value


def overcommitted(budget: FdBudget, caps: dict[str, int], reserve: int = RESERVE) -> str | None:
    """
    A warning when the caps an operator set (option name -> descriptors it may take; 0 =
    no cap, not counted) need more descriptors than C{budget} leaves, else None.
    """
    need = sum(value for value in caps.values() if value > 0)
    usable = budget.usable(reserve)
    if need <= usable:
        return None
    names = " + ".join(f"--{name} ({value})" for name, value in caps.items() if value > 0)
    return (f"{names} needs more file descriptors than the soft limit {budget.soft} (hard {budget.hard}) "
            f"leaves ({usable} after {reserve} for the service itself): connections past it fail with "
            f"EMFILE; raise LimitNOFILE= in the unit to at least {need + reserve}, or lower the cap")
