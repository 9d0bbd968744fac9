"""
The one line each public service logs at startup (after the fd budget line): what it
listens on, its TLS or ACME state and its bounds, so that an operator reading
C{journalctl -u pipegate-relay} sees the configuration in force without the unit file.
"""

from __future__ import annotations


def _seconds(value: float) -> str:
    return f"{value:g} s" if value else "off"


def relay_line(options, per_ip: int, total: int) -> str:
    """The relay's line; C{per_ip} and C{total} are the connection caps in force."""
    listen = options["listen"]
    tls = options.get("tls")
    if tls is not None:
        until = tls.options.certificate.to_cryptography().not_valid_after_utc.isoformat()
        tls_state = f"TLS from --tls-cert {options['tls-cert']}, valid until {until}, reloaded on SIGHUP"
    elif listen.lower().startswith("ssl:"):
        tls_state = "TLS from the ssl: endpoint, read once"
    else:
        tls_state = "plain HTTP, no TLS"
    if options["acme-directory"]:
        acme = f"ACME from {options['acme-directory']} for {options['domain']}, HTTPS on {options['https']}"
    else:
        acme = "ACME off"
    metrics = f"metrics on {options['metrics']}" if options["metrics"] else "metrics off"
    body = f"up to {options['max-body-bytes']} bytes" if options["max-body-bytes"] else "unlimited"
    hub = f"; port-plane hub on {' '.join(options['mux'])}" if options["mux"] else ""
    return (f"relay on {listen} ({tls_state}); {acme}; {metrics}; bounds: {per_ip} connections per IP, "
            f"{total} in all, {options['max-in-flight']} requests in flight per tunnel, bodies {body}, "
            f"request timeout {_seconds(options['request-timeout'])}, idle timeout "
            f"{_seconds(options['idle-timeout'])}, drain timeout {_seconds(options['drain-timeout'])}; "
            f"revocation list {options['revoked'] or 'off'}{hub}")


def node_line(kind: str, options) -> str:
    """A gateway's or provider's line: its links, their certificate, and (gateway) where gates bind."""
    if options["tls-cert"]:
        tls = f"TLS from --tls-cert {options['tls-cert']}"
    else:
        tls = "TLS, a new self-signed certificate each start"
    if options["tls-verify"]:
        tls += f"; dialled peers must prove {options['tls-verify']}"
    links = " ".join(options["mux"]) or "none"
    dials = " ".join(options["connect"]) or "none"
    gates = f"; gates on {options['listen']}" if kind == "gateway" else ""
    metrics = f"metrics on {options['metrics']}" if options["metrics"] else "metrics off"
    return (f"{kind} links on {links} ({tls}); dials {dials}{gates}; {metrics}; "
            f"drain timeout {_seconds(options['drain-timeout'])}")


def log_node_start(kind: str, budget, capped: dict[str, int], options) -> None:
    """
    After a node's fd budget line: a warning when an option in C{capped} asks for more
    descriptors than C{budget} allows, the node's own line (L{node_line}), and a warning
    for a problem with its --tls-cert.
    """
    from twisted.logger import Logger

    from pipegate.fdlimit import overcommitted

    log = Logger(namespace=f"pipegate.{kind}")
    warning = overcommitted(budget, capped)
    if warning:
        log.warn("{problem}", problem=warning)
    log.info("{line}", line=node_line(kind, options))
    if options.get("tls-problem"):
        log.warn("--tls-cert {path}: {tls_problem}", path=options["tls-cert"], tls_problem=options["tls-problem"])
