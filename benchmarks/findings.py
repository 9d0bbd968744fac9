"""
Why a target of issue 22 is not met, per scenario: what the profiles showed and what the
remaining cost is.  The report prints a scenario's entry under its table when one of its
targets is missed in that run (benchmarks/report.py); the profiles are the flame graphs in
benchmarks/results/ and the measurements written up in benchmarks/README.md.
"""

FINDINGS = {
    "http_small": (
        "Each request crosses two Python processes, and in each it is parsed and written twice: "
        "the relay runs twisted.web's HTTP/1.1 server for the caller and its own WebSocket framing "
        "towards the connector; the connector runs the link and its own HTTP/1.1 client "
        "(pipegate/http/appclient.py, httptools) towards the app. perf (python -m "
        "benchmarks.perf_split http): 83 % of relay + connector CPU is the Python interpreter, 13 % "
        "the kernel; strace: one recvfrom and one sendto per request in each process (and one send "
        "per reactor turn on the link), so what is left is interpreter work, about two thirds of it "
        "in the relay, a quarter of that twisted.web's request parsing and Request set-up. wrk's "
        "closed loop makes latency about 50 / throughput with p99 about 1.6 x p50 (as for the app "
        "alone in the same run): p99 <= 10 ms at -c50 needs about 8,000 req/s, some 150 us of relay + "
        "connector CPU per request with wrk and the app on the same two cores, a third less than "
        "now. CPU per request rises as the load falls (fewer requests share a wakeup), so at low "
        "rates the reactor's per-event cost and the kernel's are most of it."
    ),
    "tcp": (
        "Bulk TCP costs gateway + provider about 1.8-2.5 CPU-s/GB against the HAProxy pair's 1.5-1.8: "
        "the same TLS work (OpenSSL's AES-GCM, one SSL_write and one send per 64 KiB frame with the "
        "batched TLS layer) plus, per 64 KiB, one Python read, one frame and one credit check at "
        "each end. HAProxy splices and encrypts in C with no per-chunk interpreter work. The "
        "remaining cost per GB is the interpreter's per-frame work (about 15,000 frames per GB at "
        "each end) and the copies between the socket, OpenSSL's memory BIOs and Python bytes; "
        "HAProxy's single thread per process also keeps its two processes off each other's core. "
        "py-spy (results/flamegraph-tcp-*.svg): in each process about 40 % of the samples are under "
        "the link's TLS receive (OpenSSL's recv about 10 %, then delivery into the channels' "
        "sockets), 22 % under reading a client or service socket and sending it as DATA "
        "(SSL_write about 8 %, the send about 13 %), 5 % Twisted's per-event log context (since "
        "gone: gateway and provider dispatch without it, benchmarks/README.md \"Per-connection "
        "work on the port plane\"); the mux decoder is 4 %. perf: 37 % kernel, 36 % interpreter, "
        "11 % the C library's copies, 7 % AES-GCM. Fewer, larger reads (256 KiB instead of 64 and "
        "127 KiB) cost 10-50 % more CPU per GB and were not kept (benchmarks/README.md, \"Bulk TCP: "
        "larger reads\")."
    ),
    "redis": (
        "At -P 1 every request is four reactor events (a read at the gate, the frame at the "
        "provider, the answer at the provider, the frame at the gateway), each paying Twisted's "
        "dispatch, a TLS record and a send: about 25 µs of CPU per SET+GET (23:02 run: 24.8, the "
        "HAProxy pair 29.8; ratio 0.32 x direct against its 0.28 x), against ssh's 19-22 (C), whose "
        "ratio (0.34-0.36 x) sets the target. py-spy (flamegraph-redis-*-after.svg) puts the "
        "sends first (36-48 % of wall samples; on loopback a send also wakes the other process), then "
        "the reactor's per-event dispatch and log context (~11 %; the log context has since gone, "
        "about 10 % less CPU per request in cpu_ab), then the TLS layer; the link already aggregates "
        "small writes per reactor turn (one TLS send per 13 requests under load), now flushed "
        "without a timed call. Per request each process runs about 40-43 Python calls (cProfile; "
        "55.8 / 52.2 before the per-message path lost its Data objects, benchmarks/README.md)."
    ),
    "udp_rr": (
        "One request is one datagram in and one out at each of two processes: four reactor events, "
        "two DATAGRAM frames in TLS records, two recvfrom and two sendto. The direct path's backend, "
        "a bare Twisted UDP echo, spends about 6 us of CPU per datagram; the gateway and the "
        "provider each spend 20-23 us per request (python -m benchmarks.udp_rr_cpu; "
        "benchmarks/README.md, \"Small messages on the port plane\"), about two bare echoes' "
        "work each plus the frames and TLS. 0.5 x direct would need gateway + provider together "
        "under about 10 us per request, less than two bare echoes, on the two cores the load "
        "generator and the backend also use: out of reach for a Python process per hop (Python has "
        "no recvmmsg/sendmmsg to batch flows' datagrams)."
    ),
    "connect": (
        "On this 2-core machine connect latency follows CPU, not round trips: client, gateway, "
        "provider and echo backend spend about 2 ms of CPU per connection together against "
        "1.0-1.4 ms of latency. perf: the gateway is 67 % in the interpreter, 22 % in the kernel; "
        "cProfile: about 640 Python calls per connection in the gateway and 665 in the provider "
        "(from 935-1,000, then 850-880, then 710), callgrind about 780,000 and 815,000 instructions "
        "(from 1.1 million before the legacy log context per event, the TLS layer's timed flushes "
        "and its WantReadErrors went, and from 870,000 before a gate connection's first bytes were "
        "read at accept and a finished channel closed in its turn), most of the rest Twisted's "
        "reactor loop, TCP setup and teardown and pyOpenSSL's wrappers over 5-6 wakeups per "
        "connection per process. Sending the client's first bytes with OPEN (a wire "
        "change that removes the OPEN_OK round trip) cut p50 by only 0.03 ms and was not kept. "
        "p50 was on the 1.0 ms line (0.92-1.02 ms) before that last pass; after it 0.89 ms (0.87-1.06 "
        "over the repetitions) and, in a run on a host slowed by other load (the HAProxy pair 1.29 -> "
        "1.47 ms, direct 0.13 -> 0.17 ms), 1.16 ms; a wider margin needs fewer Python layers per event "
        "(benchmarks/README.md, \"Connect latency through a gate\" and \"Per-connection work on "
        "the port plane\")."
    ),
    "idle": (
        "A Python process with Twisted, OpenSSL and cryptography loaded is already ~43 MiB (the "
        "direct column), so no Twisted service is under 40 MiB. Against stock `twistd -n web` the "
        "connector, gateway and provider are within 5 MiB; the relay sits on that line (5.0-5.5 MiB "
        "over in the runs of 2026-12-07: 56.2 MiB each time, the yardstick moves). It carries "
        "Autobahn's WAMP layer and cbor2 (`autobahn.twisted.websocket` imports them whether or not "
        "they are used, about 3.5 MiB; keeping out the part that `autobahn.twisted`'s package "
        "imports, by putting a bare module in sys.modules, measured 0.6 MiB less and was not done: it "
        "depends on Autobahn's private layout), "
        "PyJWT and its own code; Autobahn's NVX wrappers (pycparser at import) are skipped "
        "(AUTOBAHN_USE_NVX=0, pipegate/http/__init__.py), the hub, ACME, metrics and inspector load "
        "only with their options (tests/test_lean_startup.py), and startup's freed heap is given "
        "back (pipegate/heap.py)."
    ),
}
