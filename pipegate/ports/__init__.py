"""The port plane: providers advertise TCP/UDP services, gateways open ports for them."""
