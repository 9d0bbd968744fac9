# The pipegate image: every PipeGate command (twistd pipegate-provider / -gateway / -server /
# -client, pipegate ...), and the program of the gateway's Docker helpers (pipegate forward).
# See docs/docker.md.
#
#   docker build -t pipegate .
#
# The label keeps Docker discovery away from containers of this image (providers, gateways
# and helpers are never announced as services themselves).
FROM python:3.11-slim

LABEL pipegate.EXCLUDE="true" \
      org.opencontainers.image.title="pipegate" \
      org.opencontainers.image.description="Self-hosted tunnels on Twisted: HTTP relay + connector, TCP/UDP port gateway"

WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY pipegate ./pipegate
COPY twisted ./twisted
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && rm -rf /src \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pipegate

WORKDIR /
# Unprivileged by default. A provider or gateway in Docker mode needs the Engine socket:
# mount it and add the socket's group (docker run --group-add "$(stat -c %g /var/run/docker.sock)"),
# or run with --user root as Hypergate's README does.  Helpers listen on the services' ports
# inside their own network namespace; the gateway creates them with the sysctl
# net.ipv4.ip_unprivileged_port_start=0 so that this user may bind ports below 1024 there.
USER pipegate
CMD ["pipegate", "--help"]
