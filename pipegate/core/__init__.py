"""Plane-neutral, sans-IO machines: no reactor, no sockets (see DESIGN.md section 3)."""
