# The compose stack's Docker engine (docker-compose.yml, service `docker`): Docker-in-Docker
# plus what docker/dind-entrypoint.sh needs to contain builds: bash (for
# scripts/infra/build-network.sh, bind-mounted), tinyproxy (the builds' egress proxy) and
# socat (localhost:5000 -> the registry).
ARG DIND_IMAGE=docker:dind
FROM ${DIND_IMAGE}
RUN apk add --no-cache bash socat tinyproxy
