"""The HTTP plane: relay (pipegate-server) and connector (pipegate-client)."""
