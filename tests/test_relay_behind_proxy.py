"""
The relay behind a real HAProxy (docs/deployment.md 3.2): the ingress policy, the access
log and the app's X-Forwarded-* see the real callers, either from a trusted proxy's
X-Forwarded-For (C{--trusted-proxy}) or from a PROXY protocol header (C{--listen haproxy:...}).

The callers connect from 127.0.0.2 and 127.0.0.3; HAProxy and the relay talk over 127.0.0.1.
Without haproxy these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from pipegate.http.forwarded import parse_trusted_proxies
from pipegate.core.policydoc import load_policy
from tests.support import Loopback, TestApp, free_port, raw_request, split_response
from tests.test_proxyprotocol import haproxy_or_skip, start_haproxy

HTTP_MODE = """\
defaults
    mode http
    timeout connect 5s
    timeout client  30s
    timeout server  30s

frontend public
    bind 127.0.0.1:{front}
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    default_backend relay

backend relay
    server relay 127.0.0.1:{relay}
"""

TCP_MODE = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client  30s
    timeout server  30s

frontend public
    bind 127.0.0.1:{front}
    default_backend relay

backend relay
    server relay 127.0.0.1:{relay} send-proxy-v2
"""

DENY = '{"ips": {"127.0.0.2": {"allow": false}}}'


class BehindHAProxy(unittest.TestCase):

    async def start(self, config: str, **relay) -> None:
        path = haproxy_or_skip(self)
        loop = Loopback(self)
        self.app = TestApp()
        app_port = await loop.app(self.app)
        relay_port = free_port()
        listen = relay.pop("listen", "tcp:{port}:interface=127.0.0.1").format(port=relay_port)
        await loop.relay(listen=listen, policy=load_policy([DENY])[0], **relay)
        self.front = free_port()
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "haproxy.cfg"), "w") as f:
            f.write(config.format(front=self.front, relay=relay_port))
        await start_haproxy(self, path, os.path.join(directory, "haproxy.cfg"), [self.front])
        # The connector logs in through HAProxy too, as it would in a deployment.
        await loop.connector(self.front, app_port, "t1")

    async def get(self, source: str) -> tuple[int, dict]:
        raw = await raw_request(self.front, b"GET /t1/headers HTTP/1.1\r\nHost: relay.test\r\n"
                                            b"X-Forwarded-For: 127.0.0.3\r\n"  # a caller's lie
                                            b"Connection: close\r\n\r\n", source)
        status, _, _ = split_response(raw)
        if int(status.split()[1]) != 200:
            return int(status.split()[1]), {}
        return 200, {k.lower(): v for k, v in self.app.seen[-1]["headers"]}

    async def test_trusted_proxy_x_forwarded_for(self):
        await self.start(HTTP_MODE, trusted_proxies=parse_trusted_proxies("127.0.0.1"))
        self.assertEqual((await self.get("127.0.0.2"))[0], 403)
        code, headers = await self.get("127.0.0.3")
        self.assertEqual(code, 200)
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.3, 127.0.0.3, 127.0.0.1")
        self.assertEqual(headers["x-forwarded-proto"], "https")
        self.assertEqual(len(self.app.seen), 1)

    async def test_untrusted_proxy_is_the_caller(self):
        await self.start(HTTP_MODE)
        # Every caller is HAProxy (127.0.0.1) to the relay: nobody is refused.
        code, headers = await self.get("127.0.0.2")
        self.assertEqual(code, 200)
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.3, 127.0.0.2, 127.0.0.1")
        self.assertEqual(headers["x-forwarded-proto"], "http")

    async def test_proxy_protocol_listener(self):
        await self.start(TCP_MODE, listen="haproxy:tcp:{port}:interface=127.0.0.1")
        self.assertEqual((await self.get("127.0.0.2"))[0], 403)
        code, headers = await self.get("127.0.0.3")
        self.assertEqual(code, 200)
        # The relay's hop is the caller itself, from the PROXY header; the caller's own
        # X-Forwarded-For is passed along in front of it, as always.
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.3, 127.0.0.3")
        self.assertEqual(headers["x-forwarded-proto"], "http")
