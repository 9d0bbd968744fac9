"""
docs/deployment.md's systemd units as an operator copies them: every ExecStart= line that
runs twistd is parsed by twistd's own option parser with the plugin's options, with the
environment its EnvironmentFile holds and the files it names in place.  A renamed or removed
option, or a value a service no longer accepts, fails here before an operator meets it.
(systemd-analyze verify was run on the unit blocks by hand; it is not a CI dependency.)
"""

from __future__ import annotations

import json
import os
import re
import shlex

from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from pipegate import config
from tests.support import SECRET, token_for
from tests.test_systemd import make_cert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exec_lines() -> list[str]:
    with open(os.path.join(ROOT, "docs", "deployment.md"), encoding="utf-8") as f:
        text = f.read()
    return [m.group(1) for m in re.finditer(r"^\s*ExecStart=(\S*twistd .+)$", text, re.M)]


class ExecStartLines(unittest.TestCase):
    def setUp(self):
        self.etc = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.etc, "tls"))
        cert, key = make_cert("relay.example.com")
        for name, data in (("fullchain.pem", cert), ("cert.pem", cert), ("chain.pem", cert), ("privkey.pem", key)):
            with open(os.path.join(self.etc, "tls", name), "wb") as f:
                f.write(data)
        with open(os.path.join(self.etc, "services.json"), "w") as f:
            json.dump({"services": [{"gatePort": 2222, "serviceHost": "127.0.0.1", "servicePort": 22}]}, f)
        self.patch(config.EnvOptions, "environ", {
            "PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_ROUTER": "ab" * 32, "PIPEGATE_TOKEN": token_for("my-app")})

    def test_there_are_units(self):
        services = {shlex.split(line)[4] for line in exec_lines()}
        self.assertEqual(services, {"pipegate-server", "pipegate-client", "pipegate-gateway", "pipegate-provider"})

    def test_units_do_not_restart_into_a_bad_configuration(self):
        """
        A bad option exits EX_CONFIG (tests/test_processes.py): every documented unit that
        restarts on failure says RestartPreventExitStatus= with it, else systemd restarts a
        misconfigured service every RestartSec= for ever.
        """
        with open(os.path.join(ROOT, "docs", "deployment.md"), encoding="utf-8") as f:
            blocks = re.findall(r"```ini\n(.*?)```", f.read(), re.S)
        restarting = [b for b in blocks if "Restart=on-failure" in b]
        self.assertGreaterEqual(len(restarting), 4)
        for block in restarting:
            prevent = re.search(r"^RestartPreventExitStatus=(.+)$", block, re.M)
            self.assertIsNotNone(prevent, block)
            self.assertIn(str(config.EX_CONFIG), prevent.group(1).split(), block)

    def test_every_execstart_parses(self):
        checked = 0
        for line in exec_lines():
            argv = shlex.split(line.replace("/etc/pipegate", self.etc))[1:]
            if any(a.startswith("systemd:") for a in argv):
                continue   # socket activation: tests/test_systemd.py, with a socket handed over
            if "--acme-directory" in argv:
                argv += ["--acme-state", os.path.abspath(self.mktemp())]   # not /var/lib/pipegate
            options = ServerOptions()
            try:
                options.parseOptions(argv)
            except (usage.UsageError, SystemExit) as e:   # (EnvOptions: one line, SystemExit)
                self.fail(f"{line}: {e}")
            self.assertEqual((options["nodaemon"], options["pidfile"], options["logfile"]), (True, "", "-"), line)
            checked += 1
        self.assertGreaterEqual(checked, 7)
