#!/usr/bin/env bash
# Build the Dockerfile where no image registry is reachable (as on the machine ringrelay was
# written on): a Debian base image is made from Debian's package mirror with debootstrap and
# stands in for python:<version>-slim, then buildah builds the Dockerfile unchanged against it.
#   sudo apt-get install buildah debootstrap
#   deploy/build-without-registry.sh [TAG]          # default localhost/ringrelay:local
# The stand-in base has Debian's Python (3.11 on bookworm) in /usr/bin, where the official image
# has its own build in /usr/local; the Dockerfile's steps need only `python` and `useradd`.
set -euo pipefail

TAG="${1:-localhost/ringrelay:local}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"          # works inside containers too
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
BASE_TAG="debian-local"
BASE="docker.io/library/python:${BASE_TAG}-slim"

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  ctr="$(buildah from scratch)"
  buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$ctr"
  buildah commit --quiet "$ctr" "$BASE" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

mounts=()
if [ -n "${PIP_CERT:-}" ]; then
  # Behind a TLS-inspecting proxy pip needs its CA: mounted for the build's RUN steps only,
  # never copied into the image.
  conf="$(mktemp)"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$conf"
  mounts=(-v "$PIP_CERT:/etc/ssl/certs/ca-certificates.crt:ro" -v "$conf:/etc/pip.conf:ro")
fi

# --format docker: the OCI format has no HEALTHCHECK.
buildah build --quiet --format docker --pull-never --build-arg "PYTHON_VERSION=${BASE_TAG}" \
  "${mounts[@]}" -t "$TAG" "$HERE/.."
