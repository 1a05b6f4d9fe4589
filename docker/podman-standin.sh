#!/usr/bin/env bash
# Build and run the runtime image where there is no Docker engine and no image registry (CI
# machines and sandboxes): installs rootful podman with runc, then makes a local stand-in for
# the Dockerfile's base image `python:3.11-slim` from Debian bookworm's own packages
# (debootstrap: Python 3.11, pip, venv), carrying this machine's CA bundle and pip
# configuration so `pip install` inside a build reaches the same package index as the host.
#
#   docker/podman-standin.sh       # once per machine (3-5 minutes; the rootfs tar is cached); prints the flags
#   eval "$(docker/podman-standin.sh)"
#   podman $PODMAN_RUNTIME build $PODMAN_FLAGS --network host -f Dockerfile.x86 -t edgerun:x86 .
#   podman $PODMAN_RUNTIME run $PODMAN_FLAGS --network host -v "$PWD/dist/digits-x86:/bundle:ro" \
#       edgerun:x86 /bundle --host 127.0.0.1 --port 18000
#
# Why each piece: crun refuses hybrid cgroup hierarchies, runc does not. A container may not
# raise its rlimits above the machine's without CAP_SYS_RESOURCE, so PODMAN_FLAGS caps them at
# the machine's (at most 4096). Only `--network host` or `--network none` work without a
# bridge set-up: serve on 127.0.0.1 with host networking. The stand-in base is larger than the
# real one (~300 MB vs ~125 MB): compare images by the layers the Dockerfile adds.
# Idempotent: installs and imports only what is missing. Needs root.
set -eu
BASE_TAG=${BASE_TAG:-docker.io/library/python:3.11-slim}
CACHE=${STANDIN_CACHE:-/var/tmp/edgerun-standin}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DEBIAN_FRONTEND=noninteractive
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq podman runc debootstrap >/dev/null
fi
if ! podman image exists "$BASE_TAG"; then
  mkdir -p "$CACHE"
  if [ ! -f "$CACHE/base.tar" ]; then
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,passwd,ca-certificates \
      bookworm "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { echo "debootstrap failed: see $CACHE/debootstrap.log" >&2; exit 1; }
    # The official image's pip installs into the system Python; Debian's marks it externally managed.
    rm -f "$CACHE"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf /usr/bin/pip3 "$CACHE/rootfs/usr/bin/pip"
    ln -sf /usr/bin/python3 "$CACHE/rootfs/usr/bin/python"
    cp /etc/ssl/certs/ca-certificates.crt "$CACHE/rootfs/etc/ssl/certs/ca-certificates.crt"
    if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$CACHE/rootfs/etc/pip.conf"; fi
    tar -C "$CACHE/rootfs" -cf "$CACHE/base.tar.part" .
    mv "$CACHE/base.tar.part" "$CACHE/base.tar"
    rm -rf "$CACHE/rootfs"
  fi
  podman import "$CACHE/base.tar" "$BASE_TAG" >/dev/null
fi
n=$(ulimit -n); p=$(ulimit -u)
if [ "$n" = unlimited ] || [ "$n" -gt 4096 ]; then n=4096; fi
if [ "$p" = unlimited ] || [ "$p" -gt 4096 ]; then p=4096; fi
echo "PODMAN_RUNTIME='--runtime runc'"
echo "PODMAN_FLAGS='--ulimit nofile=$n:$n --ulimit nproc=$p:$p'"
