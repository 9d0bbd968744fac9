"""Run one of the tap modules in the foreground, logging to stdout (no twistd needed)."""

from __future__ import annotations

import importlib
import sys

from twisted.python import usage


def run_foreground(module_name: str, argv: list[str]) -> int:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    module = importlib.import_module(module_name)
    options = module.Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"{sys.argv[0]}: {e}", file=sys.stderr)
        return 1
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    top = module.makeService(options, reactor)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0
