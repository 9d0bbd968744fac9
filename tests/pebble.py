"""
A real ACME server for tests: Pebble (Debian package C{pebble}) with
C{pebble-challtestsrv} as its DNS, which answers 127.0.0.1 for every name, so Pebble's
HTTP-01 validation of any test name reaches the relay's plain listener on 127.0.0.1.

Recipe: ../shared/reference/test-peers.md.  Pebble's HTTPS uses a leaf signed by a
throwaway CA made here (C{ca_file}); the root that signs the certificates it issues
changes at every launch and is fetched from its management port (C{issuing_root}).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import debian_tool, free_port



def _write_tls(directory: str) -> tuple[str, str, str]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pebble test listener CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = [os.path.join(directory, n) for n in ("ca.pem", "leaf.pem", "leaf.key")]
    for path, data in zip(paths, (ca.public_bytes(pem), leaf.public_bytes(pem),
                                  key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))):
        with open(path, "wb") as f:
            f.write(data)
    return tuple(paths)


class Pebble:
    """Pebble + pebble-challtestsrv as child processes; HTTP-01 goes to C{http_port}."""

    def __init__(self, testcase, directory: str, http_port: int, validity: int | None = None) -> None:
        self.pebble = debian_tool(testcase, "pebble")
        self.challtestsrv = debian_tool(testcase, "pebble-challtestsrv")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.http_port = http_port
        self.validity = validity
        self.processes: list[subprocess.Popen] = []
        self.ca_file, self._leaf, self._key = _write_tls(directory)

    def start(self, timeout: float = 20.0) -> None:
        self.port, self.management, self.dns, dns_management = (free_port() for _ in range(4))
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": self._leaf, "privateKey": self._key, "httpPort": self.http_port,
            "tlsPort": free_port(), "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}
        if self.validity is not None:
            config["pebble"]["certificateValidityPeriod"] = self.validity
        path = os.path.join(self.directory, "pebble.json")
        with open(path, "w") as f:
            json.dump(config, f)
        log = open(os.path.join(self.directory, "pebble.log"), "ab")
        self.processes.append(subprocess.Popen(
            [self.challtestsrv, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-dns01", f"127.0.0.1:{self.dns}",
             "-http01", "", "-https01", "", "-tlsalpn01", "", "-management", f"127.0.0.1:{dns_management}"],
            stdout=log, stderr=subprocess.STDOUT))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.processes.append(subprocess.Popen(
            [self.pebble, "-config", path, "-dnsserver", f"127.0.0.1:{self.dns}"],
            stdout=log, stderr=subprocess.STDOUT, env=env))
        log.close()
        # Setup, not an assertion: wait (bounded) until the directory answers.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get(f"https://127.0.0.1:{self.port}/dir")
                break
            except OSError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                    self.stop()
                    raise RuntimeError(f"pebble did not start; see {self.directory}/pebble.log")
                time.sleep(0.05)
        self.root_file = os.path.join(self.directory, "issuing-root.pem")
        with open(self.root_file, "wb") as f:
            f.write(self.get(f"https://127.0.0.1:{self.management}/roots/0"))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.read()

    def serial_valid(self, serial: int) -> bool:
        body = json.loads(self.get(f"https://127.0.0.1:{self.management}/cert-status-by-serial/{serial:x}"))
        return body.get("Status") == "Valid"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []
