"""
C{python -m pipegate.server}: run the relay in the foreground on 0.0.0.0:8000, as the
older PipeGate did.  Options are those of C{twistd pipegate-server}.
"""

from __future__ import annotations

import sys

from pipegate.run import run_foreground


def main(argv: list[str] | None = None) -> int:
    return run_foreground("pipegate.tap.server", sys.argv[1:] if argv is None else argv,
                          "python -m pipegate.server")


if __name__ == "__main__":
    raise SystemExit(main())
