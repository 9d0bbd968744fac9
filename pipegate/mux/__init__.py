"""The port plane: the TLS-wrapped TCP multiplexer between gateways and providers (mux v1)."""
