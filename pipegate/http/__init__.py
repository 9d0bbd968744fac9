"""The HTTP plane: relay (pipegate-server) and connector (pipegate-client)."""

import os

# Autobahn's native (NVX) helpers parse their C declarations with pycparser when Autobahn is
# imported: about 1.2 MiB of RSS per process for a UTF-8 validator the links never use (they
# carry binary frames only) and a masker they call directly (pipegate._compat.xor_mask).
# Without them Autobahn masks its own few frames (handshake, pings, closes) in Python.  An
# operator's own AUTOBAHN_USE_NVX wins.
os.environ.setdefault("AUTOBAHN_USE_NVX", "0")
