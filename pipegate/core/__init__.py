"""
Plane-neutral, sans-IO building blocks: no reactor, no sockets, no Deferreds.

Both the HTTP plane (pipegate.http) and the port plane (pipegate.ports, pipegate.mux)
import from here; nothing here imports either plane.
"""
