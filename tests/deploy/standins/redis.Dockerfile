# Test stand-in for valkey/valkey (no registry here): Debian's redis-server under Valkey's command names.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/redis-server /usr/local/bin/valkey-server \
    && ln -s /usr/bin/redis-cli /usr/local/bin/valkey-cli \
    && mkdir -p /data
WORKDIR /data
CMD ["valkey-server"]
