# syntax=docker/dockerfile:1
#
# analyticsd container image: one static binary on a distroless base.
#
#   docker build -t analyticsd:local .
#   docker run --rm analyticsd:local            # = /analyticsd serve
#   docker run --rm analyticsd:local migrate    # any subcommand replaces CMD
#
# Needs BuildKit (the default builder since Docker 23) for the cache mount and
# the BUILDPLATFORM/TARGET* arguments.

# golang images set GOTOOLCHAIN=local, so this image's Go must be at least the
# version go.mod asks for: keep the two equal (`go test ./deploy/` checks it).
# A patch release, not the floating 1.26, so a rebuild of this commit uses the
# same compiler. golang:1.26.8-bookworm is used by public Dockerfiles; it was
# not pulled from this machine (no Docker engine here).
ARG GO_VERSION=1.26.8

# ---- build ----------------------------------------------------------------
# Runs on the build host's architecture and cross-compiles (CGO is off), so
# multi-arch builds (docker buildx --platform linux/amd64,linux/arm64) don't
# emulate the compiler.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build

WORKDIR /src
ENV CGO_ENABLED=0

# Module download is its own layer: it is rebuilt only when go.mod/go.sum change,
# not on every source edit.
COPY go.mod go.sum ./
RUN go mod download

COPY . .

ARG TARGETOS
ARG TARGETARCH
# Printed by `analyticsd version` (main.version, as `make build` sets it), e.g.
#   docker build --build-arg VERSION=$(git describe --always --dirty) .
ARG VERSION=dev
RUN --mount=type=cache,target=/root/.cache/go-build \
    GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w -X main.version=${VERSION}" \
        -o /out/analyticsd ./cmd/analyticsd

# The ingest spool directory (ANALYTICS_SPOOL_DIR). Distroless has no shell to
# mkdir/chown at runtime, so it is made here and copied with its owner below.
# Docker copies an image directory's contents and ownership into an empty named
# volume mounted on it, so the compose volume starts out writable by the
# runtime user too. (A bind mount does not get this: chown the host directory
# to 65532:65532 yourself.)
RUN mkdir -p /out/var/lib/analyticsd/spool \
    && chmod 0750 /out/var/lib/analyticsd /out/var/lib/analyticsd/spool

# ---- runtime --------------------------------------------------------------
# Why distroless/static rather than debian:bookworm-slim: the binary is static
# (CGO_ENABLED=0), and static-debian12 already carries what it needs at runtime
# (CA certificates for JWKS/HTTPS, tzdata, /etc/passwd with the "nonroot" user
# 65532, a 1777 /tmp) and nothing else: no shell, no package manager, far fewer
# CVEs to track, about 2 MB. The cost is no shell or curl inside the container,
# so health checks run the binary itself (`/analyticsd healthcheck`); for a
# shell while debugging, build FROM gcr.io/distroless/static-debian12:debug-nonroot
# (same base plus busybox).
#
# Distroless publishes no version tags (:nonroot moves with every Debian
# update), so the image is pinned by digest: :nonroot as of 2026-08-26, as
# recorded by public projects that pin it; not resolved from this machine (no
# registry access). Refresh deliberately, e.g. for a Debian security update:
#   crane digest gcr.io/distroless/static-debian12:nonroot
FROM gcr.io/distroless/static-debian12:nonroot@sha256:afa5c872c891853ca7fcf1f12c3edb23f7eeef36189728842dd51042ff57f7ab

COPY --from=build /out/analyticsd /analyticsd
COPY --from=build --chown=65532:65532 /out/var/lib/analyticsd /var/lib/analyticsd

ENV ANALYTICS_ADDR=:8080 \
    ANALYTICS_SPOOL_DIR=/var/lib/analyticsd/spool

# The :nonroot tag already runs as 65532; stated so the image never depends on
# the tag's default.
USER 65532:65532

EXPOSE 8080

# No HEALTHCHECK here: the same image runs one-shot subcommands (migrate,
# tenant, apikey) that must not be probed. docker-compose.yml sets the health
# check on the long-running `serve` service only.
ENTRYPOINT ["/analyticsd"]
CMD ["serve"]
