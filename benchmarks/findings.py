"""
Why a target of issue 22 is not met, per scenario: what the profiles showed and what the
remaining cost is.  The report prints a scenario's entry under its table when one of its
targets is missed in that run (benchmarks/report.py); the profiles are the flame graphs in
benchmarks/results/ and the measurements written up in benchmarks/README.md.
"""

FINDINGS = {
    "http_small": (
        "Each request crosses two Python processes, and in each it is parsed and written twice: "
        "the relay runs twisted.web's HTTP/1.1 parser and Request for the caller and Autobahn's "
        "WebSocket framing towards the connector; the connector runs Autobahn's framing and "
        "twisted.web's HTTP client (Agent, HTTP11ClientProtocol) towards the app. py-spy "
        "(flamegraph-http_small-relay-after.svg, -connector-after.svg) shows the cost spread over "
        "those four layers and the reactor's dispatch, no function of ours above 4 % self; the "
        "syscalls are down to about 6 per request per process. The remaining cost is what those "
        "layers take per message in CPython; closing the gap to 280 µs would mean replacing "
        "twisted.web's server and client and Autobahn with hand-written or C parsers, which "
        "this project builds on rather than replaces (see benchmarks/README.md, \"HTTP plane\")."
    ),
    "tcp": (
        "Bulk TCP costs gateway + provider about 2.3-2.8 CPU-s/GB against the HAProxy pair's ~1.8: "
        "the same TLS work (OpenSSL's AES-GCM, one SSL_write and one send per 64 KiB frame with the "
        "batched TLS layer) plus, per 64 KiB, one Python read, one frame and one credit check at "
        "each end. HAProxy splices and encrypts in C with no per-chunk interpreter work. The "
        "remaining cost per GB is the interpreter's per-frame work (about 15,000 frames per GB at "
        "each end) and the copies between the socket, OpenSSL's memory BIOs and Python bytes; "
        "HAProxy's single thread per process also keeps its two processes off each other's core."
    ),
    "redis": (
        "At -P 1 every request is four reactor events (a read at the gate, the frame at the "
        "provider, the answer at the provider, the frame at the gateway), each paying Twisted's "
        "dispatch, a TLS record and a send: about 40 µs of CPU per SET+GET against the HAProxy "
        "pair's 32 and ssh's 22 (one process, C). py-spy (flamegraph-redis-*-after.svg) puts the "
        "sends first (36-48 % of wall samples; on loopback a send also wakes the other process), then "
        "the reactor's per-event dispatch and log context (~11 %), then the TLS layer; the link "
        "already aggregates small writes per reactor turn (one TLS send per 13 requests under load)."
    ),
    "udp_rr": (
        "One request is one datagram in and one out at each of two processes: four reactor events, "
        "two DATAGRAM frames in TLS records, two recvfrom and two sendto, about 40 µs of CPU per "
        "request (benchmarks/README.md, \"Small messages on the port plane\": one recvfrom per "
        "wakeup, direct sends, no per-datagram objects). The direct path is one kernel round trip; "
        "0.5 x direct would need under ~7 µs of Python per datagram per process, below what one "
        "reactor event costs in CPython. Python has no recvmmsg/sendmmsg to batch flows' datagrams."
    ),
    "connect": (
        "A connection through the gate is sequential work in two processes: accept at the gate, "
        "OPEN over the link, connect to the backend, OPEN_OK back, then the byte both ways and the "
        "FIN/close each way, each step a reactor wakeup and a TLS record; ssh -L keeps one "
        "process and no second connect round trip."
    ),
    "idle": (
        "A Python process with Twisted, OpenSSL and cryptography loaded is already ~43 MiB (the "
        "direct column); the relay also loads Autobahn (about 5 MiB, its WAMP layer and cffi "
        "modules come with `autobahn.twisted.websocket`) and PyJWT."
    ),
}
