"""
Docker mode for the port plane: Hypergate's Docker mode (C{hypergate.md} section 7),
with its tagged bugs fixed; C{docs/docker.md} is the user-facing description.

Pure (no reactor, no sockets), working on the JSON the Docker Engine API returns:
  - L{labels}: the C{pipegate.EXPOSE}, C{pipegate.UNEXPOSE} and C{pipegate.EXCLUDE}
    labels (C{hypergate.*} accepted too);
  - L{containers}: what containers offer on a network (L{containers.discover}) and the
    merge with the static services;
  - L{helperspec}: the gateway's helper containers (name and create body), which need
    no router secret;
  - L{host}: the Engine's address (C{--docker}, C{DOCKER_HOST}).

Twisted (they talk to the Engine through L{pipegate.ports.engine.EngineClient}):
  - L{loop}: the refresh loop both sides share;
  - L{discovery}: the provider's L{discovery.DockerDiscovery};
  - L{helpermanager}: the gateway's L{helpermanager.HelperManager}.
"""
