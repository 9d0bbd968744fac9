# The four twistd services of PipeGate.  This file holds ServiceMakers only and imports
# nothing from pipegate, so `twistd --help` stays fast and a broken module cannot hide
# the others.  There must be no __init__.py in this directory.
from twisted.application.service import ServiceMaker

pipegateServer = ServiceMaker(
    "PipeGate relay", "pipegate.tap.server",
    "Public HTTP relay: serves /<connection-id>/... through connected connectors",
    "pipegate-server",
)
pipegateClient = ServiceMaker(
    "PipeGate connector", "pipegate.tap.client",
    "Connector: TARGET_URL SERVER_URL; forwards relay requests to a local web app",
    "pipegate-client",
)
pipegateProvider = ServiceMaker(
    "PipeGate provider", "pipegate.tap.provider",
    "Port plane provider: announces private TCP/UDP services to gateways",
    "pipegate-provider",
)
pipegateGateway = ServiceMaker(
    "PipeGate gateway", "pipegate.tap.gateway",
    "Port plane gateway: opens announced gate ports and forwards them to providers",
    "pipegate-gateway",
)
