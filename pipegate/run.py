"""Run one of the tap modules in the foreground, logging to stdout (no twistd needed)."""

from __future__ import annotations

import importlib
import sys

from twisted.python import usage

from pipegate.config import EX_CONFIG


def run_foreground(module_name: str, argv: list[str], program: str) -> int:
    """
    Run tap module C{module_name} with C{argv}; C{program} (C{python -m pipegate.server})
    names the command in the usage line and in the one-line error a bad option gives.
    """
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    module = importlib.import_module(module_name)
    options = module.Options()
    options.synopsis = f"Usage: {program} {options.synopsis}"
    options.program = program   # names the command in a listener's bind error too (config.TopService)
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"{program}: {e}", file=sys.stderr)
        return EX_CONFIG
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    top = module.makeService(options, reactor)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0
