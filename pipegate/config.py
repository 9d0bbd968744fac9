"""
Option and environment plumbing shared by every service.

Every long option C{--some-option} of a service also reads C{PIPEGATE_SOME_OPTION};
a flag on the command line beats the variable.  Values are converted and checked in
C{postOptions} so that a bad value stops startup with one line naming the option.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

#: Exit status of a service stopped by its own configuration (a bad option, variable or file):
#: sysexits.h's EX_CONFIG.  A systemd unit's C{RestartPreventExitStatus=78} then keeps it stopped
#: instead of restarting into the same mistake every C{RestartSec=} (docs/deployment.md §1).
EX_CONFIG = 78
#: Exit status of a connector whose token the relay refused (sysexits.h's EX_NOPERM): no retry
#: helps until a new token is installed.
EX_NOPERM = 77

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_name(option: str) -> str:
    return "PIPEGATE_" + option.upper().replace("-", "_")


def _whole(value: str) -> int:
    """C{int(value)}, whose error says what was expected rather than C{invalid literal for int()}."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None


def _number(value: str) -> float:
    """C{float(value)}, whose error says what was expected rather than C{could not convert string}."""
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None


def positive_int(value: str) -> int:
    number = _whole(value)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def non_negative_int(value: str) -> int:
    number = _whole(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def positive_float(value: str) -> float:
    number = _number(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def non_negative_float(value: str) -> float:
    number = _number(value)
    if not number >= 0:
        raise ValueError("must be 0 or more")
    return number


def _appender(name: str, help: str):
    """The C{opt_} method of repeatable option C{name} (usage.Options wants one argument)."""
    def opt(self, value: str) -> None:
        self.append(name, value)
    opt.__doc__ = help
    return opt


#: The small HTTP listeners' bounds (pipegate.accept.SiteLimits), options of every service.
API_PARAMETERS = [
    ["api-max-conns-per-ip", None, "16", "Connections one IP address may hold to each small HTTP listener "
                                         "(--metrics and /status; the gateway's --unlimited, the provider's "
                                         "--resolver); 0 = no cap.", non_negative_int],
    ["api-max-conns", None, "256", "Connections to each small HTTP listener in all; 0 = no cap.",
     non_negative_int],
    ["api-idle-timeout", None, "30", "Seconds a connection to a small HTTP listener may stay idle.",
     positive_float],
    ["api-max-body-bytes", None, "65536", "Largest request body a small HTTP listener reads; larger -> 413 "
                                           "at once, nothing spooled. 0 = no bound.", non_negative_int],
]


class EnvOptions(usage.Options):
    """
    C{usage.Options} whose parameters and flags fall back to C{PIPEGATE_*} variables.

    A parameter's converter is the fifth item of its C{optParameters} entry,
    C{[name, short, default, help, convert]} (C{None} or none: the string as given), next
    to what it converts.  Each value,
    whether from the flag, the variable or the default, is converted once in
    L{postOptions} and any error names the option (the class keeps the first four
    items for C{usage.Options}, whose own coercion would name neither).

    Repeatable options are listed as C{optRepeatable = [[name, split, help], ...]} (in
    the class or a mixin): each gets its C{opt_} method, starts as an empty list and
    reads C{PIPEGATE_<NAME>} (space-separated values with C{split}, else one value).
    """

    converters: Mapping[str, Callable[[str], Any]] = {}
    environ: Mapping[str, str] = os.environ
    optRepeatable: list = []

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        converters: dict[str, Callable[[str], Any]] = {}
        for klass in reversed(cls.__mro__[1:]):
            converters.update(klass.__dict__.get("converters", {}))
        own = cls.__dict__.get("optParameters")
        if own is not None:
            converters.update({p[0]: p[4] for p in own if len(p) > 4 and p[4] is not None})
            cls.optParameters = [list(p[:4]) for p in own]
        cls.converters = converters
        for name, _split, help in cls.repeatables():
            setattr(cls, "opt_" + name.replace("-", "_"), _appender(name, help))

    @classmethod
    def repeatables(cls) -> list:
        """Every C{optRepeatable} entry of the class and its bases (mixins included)."""
        seen: dict[str, list] = {}
        for klass in reversed(cls.__mro__):
            for entry in klass.__dict__.get("optRepeatable", ()):
                seen[entry[0]] = entry
        return list(seen.values())

    def __init__(self) -> None:
        super().__init__()
        self._from_env: set[str] = set()   # repeatable options whose values came from a variable
        for name, _split, _help in self.repeatables():
            self[name] = []

    def append(self, name: str, value: str) -> None:
        """Add to a repeatable option; the first flag replaces what the variable gave."""
        if name in self._from_env:
            self._from_env.discard(name)
            self[name] = []
        self[name].append(value)

    def repeatable_from_env(self, name: str, split: bool = False) -> None:
        """
        Take repeatable option C{name} from its C{PIPEGATE_*} variable, if set: a
        space-separated list with C{split}, else one value (inline JSON may hold spaces).
        A flag on the command line then replaces it (L{append}).
        """
        value = self.environ.get(env_name(name))
        if value is not None:
            self[name] = value.split() if split else [value]
            self._from_env.add(name)

    def parseOptions(self, options=None):
        try:
            # Variables first, so that whatever the command line says overwrites them.
            self._apply_env()
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise  # a caller of our own (python -m, tests) reports it
            # Under twistd: left alone, twistd prints its whole usage (about 60 lines)
            # before the line that matters.  Print that line only, and exit EX_CONFIG.
            print(f"{self.program_name()}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EX_CONFIG) from None

    def program_name(self) -> str:
        """C{twistd pipegate-server} under twistd, else C{program} if set, else the running script's name."""
        if getattr(self, "program", None):
            return self.program
        script = os.path.basename(sys.argv[0])
        if self.parent is not None and getattr(self.parent, "subCommand", None):
            runner = script if script in ("twistd", "twist") else "twistd"
            return f"{runner} {self.parent.subCommand}"
        return script

    def _apply_env(self) -> None:
        for name, split, _help in self.repeatables():
            self.repeatable_from_env(name, split=split)
        names = [p[0] for p in getattr(self, "optParameters", [])]
        flags = [f[0] for f in getattr(self, "optFlags", [])]
        for name in names + flags:
            value = self.environ.get(env_name(name))
            if value is None:
                continue
            if name in flags:
                lowered = value.strip().lower()
                if lowered not in TRUE | FALSE:
                    raise usage.UsageError(f"{env_name(name)}: expected true or false, got {value!r}")
                self[name] = 1 if lowered in TRUE else 0
            else:
                self[name] = value

    def postOptions(self) -> None:
        for name, convert in self.converters.items():
            value = self.get(name)
            if not isinstance(value, str):
                continue
            try:
                self[name] = convert(value)
            except (ValueError, TypeError) as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        self.check()

    def check(self) -> None:
        """Cross-option validation; raise L{usage.UsageError} naming the option."""


def auto_or_non_negative_int(value: str) -> int | None:
    """C{"auto"} -> C{None} (the service sizes it from its fd budget); else an int >= 0 (0 = no cap)."""
    if value.strip().lower() == "auto":
        return None
    number = _whole(value)
    if number < 0:
        raise ValueError('must be "auto", 0 (no cap) or more')
    return number


def auto_or_positive_int(value: str) -> int | None:
    """C{"auto"} -> C{None} (the service works it out); else an int > 0."""
    return None if value.strip().lower() == "auto" else positive_int(value)


def endpoint_hint(value: str) -> str:
    """What to write instead of a port or a host:port given where an endpoint string goes."""
    value = value.strip()
    if value.isdigit():
        return f" (write tcp:{value} for TCP port {value})"
    host, _, port = value.rpartition(":")
    if port.isdigit() and ("." in host or host == "localhost") and ":" not in host and "=" not in host:
        return f" (write tcp:{value})"
    return ""


def check_server_endpoint(name: str, value: str | None) -> None:
    """Stop startup with one line naming C{--name} when C{value} is not a server endpoint."""
    if not value:
        return
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, value)
    except Exception as e:  # endpoint parsers raise many kinds; all mean a bad value
        raise usage.UsageError(f"--{name}: {e or type(e).__name__}{endpoint_hint(value)}") from None


def check_pem_certificate(name: str, path: str | None) -> None:
    """Stop startup with one line naming C{--name} unless C{path} holds a PEM certificate."""
    if not path:
        return
    from twisted.internet import ssl

    try:
        with open(path, "rb") as f:
            ssl.Certificate.loadPEM(f.read())
    except OSError as e:
        raise usage.UsageError(f"--{name}: {path}: {e.strerror}") from None
    except Exception:   # pyOpenSSL's crypto.Error, or an empty file: not a certificate either way
        raise usage.UsageError(f"--{name}: {path}: not a PEM certificate") from None


def _listen_port(description: str) -> str | None:
    """The port (or unix path) a server endpoint string listens on: C{tcp:8000:...} -> C{"8000"}."""
    kind, _, rest = description.partition(":")
    if not rest or kind.lower() == "systemd":
        return None
    first = rest.replace("\\:", "\0").split(":")[0].replace("\0", ":")
    return first.partition("=")[2] if first.startswith(("port=", "address=")) else first


def cannot_listen(options: Mapping[str, Any], error: BaseException) -> str:
    """
    One line for a listener that could not bind at startup: the option that asked for it
    (found by its port), the address, the reason, and what to do.
    """
    port = getattr(error, "port", None)
    socket_error = getattr(error, "socketError", None)
    reason = getattr(socket_error, "strerror", None) or str(socket_error or error)
    errno = getattr(socket_error, "errno", None)
    named = ""
    for name, value in options.items():
        for description in value if isinstance(value, list) else [value]:
            if not isinstance(description, str) or ":" not in description:
                continue
            listens = _listen_port(description)
            if listens is None:
                continue
            if (port is not None and listens == str(port)) or (
                    isinstance(error, OverflowError) and listens.isdigit() and int(listens) > 65535):
                named = f"--{name} {description}: "
                break
        if named:
            break
    if isinstance(error, OverflowError):
        return f"{named}the port must be 0 to 65535"
    where = f"{getattr(error, 'interface', None) or 'any'}:{port}" if port is not None else "the address"
    hint = {98: "another program, perhaps another PipeGate, holds it: stop that one or choose another port",
            13: "ports below 1024 need root or CAP_NET_BIND_SERVICE (AmbientCapabilities= in a systemd "
                "unit): choose a port above 1023",
            99: "this host has no such address: use one of its own, or 0.0.0.0"}.get(errno, "")
    return f"{named}cannot listen on {where}: {reason}" + (f" ({hint})" if hint else "")


def say_where_a_daemon_goes(options) -> None:
    """
    Without C{-n}, twistd goes to the background without a word: one line on the terminal
    says where the log is and how to stop it (twistd has not redirected stderr yet).
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon", True) or not hasattr(options, "program_name"):
        return
    logfile = parent.get("logfile") or "twistd.log"
    pidfile = parent.get("pidfile") or "twistd.pid"
    print(f"{options.program_name()}: running in the background (no -n): log in {logfile}, "
          f"stop with kill $(cat {pidfile})", file=sys.stderr, flush=True)


class TopService(service.MultiService):
    """
    The top service of each twistd plugin: a listener that cannot bind (port taken,
    privileged port, no such address) stops startup with one line naming its option, as a
    bad option does, instead of twistd's 40-line traceback.  Exit status 1 as before, so
    systemd still sees the failure.
    """

    log = Logger()

    def __init__(self, options: Mapping[str, Any], reactor=None) -> None:
        super().__init__()
        self.options = options
        self.reactor = reactor
        say_where_a_daemon_goes(options)

    def startService(self) -> None:
        super().startService()
        # Only as a command (twistd, python -m): a test's service must not take the test
        # runner's signals.
        as_command = getattr(self.options, "parent", None) is not None or getattr(self.options, "program", None)
        if self.reactor is not None and as_command:
            self.reactor.addSystemEventTrigger("before", "shutdown", self.arm_second_signal)

    def arm_second_signal(self) -> None:
        """
        The first SIGINT/SIGTERM started a drain (up to --drain-timeout): a second one ends
        every drain now, cutting what is still in flight, instead of twistd's
        ReactorNotRunning traceback and more waiting.
        """
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def second(signum, frame):
            self.reactor.callFromThread(self.stop_now)
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, second)

    def stop_now(self) -> None:
        from pipegate.drain import cut_drains

        self.log.warn("second signal: stopping now, cutting {count} drain(s)", count=cut_drains())

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OverflowError) as e:
            program = getattr(self.options, "program_name", lambda: "pipegate")()
            raise SystemExit(f"{program}: {cannot_listen(self.options, e)}") from None
