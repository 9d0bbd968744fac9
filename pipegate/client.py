"""
C{python -m pipegate.client TARGET_URL SERVER_URL}: run the connector in the foreground.
Options are those of C{twistd pipegate-client}.
"""

from __future__ import annotations

import sys

from pipegate.run import run_foreground


def main(argv: list[str] | None = None) -> int:
    return run_foreground("pipegate.tap.client", sys.argv[1:] if argv is None else argv,
                          "python -m pipegate.client")


if __name__ == "__main__":
    raise SystemExit(main())
