"""
The C{pipegate} command: C{token}, C{router-secret}, C{scan}, C{unlimited-token}, C{demo},
C{forward}.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

from pipegate import auth


def cmd_router_secret(args: argparse.Namespace) -> int:
    print(secrets.token_hex(32))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from pipegate.mux.scan import main as scan_main

    secret = args.router or os.environ.get("PIPEGATE_ROUTER")
    if not secret:
        print("pipegate scan: --router: the router secret is required (or PIPEGATE_ROUTER)", file=sys.stderr)
        return 2
    from twisted.internet import endpoints, reactor

    from pipegate.config import endpoint_hint

    try:
        endpoints.clientFromString(reactor, args.connect)
    except Exception as e:  # endpoint parsers raise many kinds; all mean a bad value
        print(f"pipegate scan: --connect: {args.connect}: {e or type(e).__name__}{endpoint_hint(args.connect)}",
              file=sys.stderr)
        return 2
    return scan_main(secret, args.connect, args.timeout)


def cmd_unlimited_token(args: argparse.Namespace) -> int:
    from pipegate.ports.unlimited import make_token

    secret = args.secret or os.environ.get("PIPEGATE_UNLIMITED_SECRET")
    if not secret:
        print("pipegate unlimited-token: --secret is required (or PIPEGATE_UNLIMITED_SECRET)", file=sys.stderr)
        return 2
    print(make_token(secret, args.ip, int(time.time() * 1000)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipegate.demo import run, run_ports

    if args.ports:
        return run_ports(args.gate_port)
    return run(args.port, args.inspect_port)


def cmd_forward(args: argparse.Namespace) -> int:
    from pipegate.ports.forward import main as forward_main

    return forward_main(args.to, args.forwards, args.listen)


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import os
    import urllib.error
    import urllib.request

    from pipegate.status import format_status

    import http.client

    url = args.url.rstrip("/")
    if "://" not in url:
        url = "http://" + url   # `pipegate status 127.0.0.1:9100`
    if not url.endswith("/status"):
        url += "/status"
    req = urllib.request.Request(url)
    token = args.token or os.environ.get("PIPEGATE_STATUS_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as response:
            status = json.loads(response.read(16 * 1024 * 1024))
    except http.client.HTTPException:
        print(f"pipegate status: {url}: not an HTTP answer (is this a --metrics listener?)", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        hint = " (is this a --metrics listener?)" if getattr(e, "code", None) == 404 else ""
        print(f"pipegate status: {url}: {getattr(e, 'reason', e)}{hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        sys.stdout.write(format_status(status))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipegate", description="PipeGate tunnels.")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="mint a connection id and a JWT (needs PIPEGATE_JWT_SECRET)")
    auth.token_arguments(token)
    secret = sub.add_parser("router-secret", help="print a new router secret (64 hex characters)")
    secret.set_defaults(func=cmd_router_secret)
    scan = sub.add_parser("scan", help="connect to a provider or gateway as an observer and list its routes")
    scan.add_argument("--router", default=None, help="router secret (default: PIPEGATE_ROUTER)")
    scan.add_argument("--connect", required=True, help="client endpoint of the peer, e.g. tcp:gw.example.com:7000")
    scan.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for an answer (default 15)")
    scan.set_defaults(func=cmd_scan)
    unlimited = sub.add_parser("unlimited-token", help="print a token for a gateway's /unlimited endpoint")
    unlimited.add_argument("--secret", default=None, help="the gateway's --unlimited-secret")
    unlimited.add_argument("--ip", required=True, help="the client IP the grant is for")
    unlimited.set_defaults(func=cmd_unlimited_token)
    demo = sub.add_parser("demo", help="run a relay, a connector and a small web app on loopback")
    demo.add_argument("-p", "--port", type=int, default=8000, help="relay port (default 8000; 0 = any)")
    demo.add_argument("--inspect-port", type=int, default=4040,
                      help="request inspector port on 127.0.0.1 (default 4040, any free one if taken; 0 = any)")
    demo.add_argument("--ports", action="store_true",
                      help="the port plane instead: a gateway and a provider publishing the app's TCP port")
    demo.add_argument("--gate-port", type=int, default=7001, help="with --ports: the gate's port (default 7001)")
    demo.set_defaults(func=cmd_demo)
    forward = sub.add_parser("forward", help="forward ports to a gateway's gates (the Docker helper's program)")
    forward.add_argument("--to", required=True, help="host or address of the gateway, as seen from here")
    forward.add_argument("--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    forward.add_argument("forwards", nargs="+", metavar="PORT/PROTO=GATE_PORT",
                         help="listen on PORT (tcp or udp) and forward to the gateway's GATE_PORT")
    forward.set_defaults(func=cmd_forward)
    status = sub.add_parser("status", help="show the /status of a relay, gateway, provider or connector as tables")
    status.add_argument("url", help="the --metrics listener, e.g. http://127.0.0.1:9100")
    status.add_argument("--json", action="store_true", help="print the JSON as it is")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    status.add_argument("--token", default=None,
                        help="the relay's --status-token (default: $PIPEGATE_STATUS_TOKEN)")
    status.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return args.func(args)
