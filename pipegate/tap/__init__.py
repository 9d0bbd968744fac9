"""twistd service makers: one module per service, each with Options and makeService."""
