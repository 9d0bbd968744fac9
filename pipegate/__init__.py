"""PipeGate: self-hosted tunnels on Twisted."""

__version__ = "0.1.0"
