# Test stand-in for prom/prometheus (no registry here): Debian's prometheus, same entrypoint contract.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
