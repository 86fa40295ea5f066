# syntax=docker/dockerfile:1
# Multi-stage build: a static cacheproxy on a small non-root runtime image.
#   docker build --build-arg REVISION=$(git rev-parse HEAD) -t cacheproxy .
#   docker run --rm -p 8080:8080 -p 9090:9090 cacheproxy
#   docker run --rm -p 8080:8080 -v $PWD/my.toml:/etc/cacheproxy/config.toml:ro cacheproxy
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The same command CI runs (scripts/build-static.sh). The context has no
# .git (.dockerignore): the revision for -version comes as a build arg.
ARG REVISION=""
RUN REVISION="$REVISION" sh scripts/build-static.sh /out/cacheproxy

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/cacheproxy /cacheproxy
COPY deploy/container.toml /etc/cacheproxy/config.toml
USER 65532:65532
EXPOSE 8080 9090
# No shell in the image: the binary probes its own admin /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/cacheproxy", "-healthcheck", "-config", "/etc/cacheproxy/config.toml"]
ENTRYPOINT ["/cacheproxy"]
CMD ["-config", "/etc/cacheproxy/config.toml"]
