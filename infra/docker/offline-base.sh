#!/bin/sh
# The image every tuneflow image starts from where no registry is reachable: Debian bookworm made here with
# debootstrap (Python 3.11, venv, CA certificates), imported into Docker. `make images OFFLINE=1` runs it; an image
# of that name already there is kept (`docker rmi tuneflow-base:bookworm` to make it again).
#   sh infra/docker/offline-base.sh [IMAGE]       # as root; needs debootstrap and a Debian mirror (DEBIAN_MIRROR)
# It takes two things from this host, so that pip inside the builds works as it does here: the CA bundle pip trusts
# (PIP_CERT, else the system's: a proxy that re-signs TLS is trusted in the images too) and the wheels in
# PIP_FIND_LINKS (e.g. the CPU build of torch), kept in /opt/wheels with PIP_FIND_LINKS set.
set -eu
IMAGE=${1:-tuneflow-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE is there (docker rmi $IMAGE to make it again)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "offline-base.sh: needs debootstrap (apt-get install -y debootstrap)" >&2; exit 2; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/host-ca-bundle.crt"
set -- --change "ENV LANG=C.UTF-8" --change "ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt" --change 'CMD ["/bin/bash"]'
if [ -n "${PIP_FIND_LINKS:-}" ] && ls "$PIP_FIND_LINKS"/*.whl >/dev/null 2>&1; then
  mkdir -p "$root/opt/wheels"
  cp "$PIP_FIND_LINKS"/*.whl "$root/opt/wheels/"
  set -- "$@" --change "ENV PIP_FIND_LINKS=/opt/wheels"
fi
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import "$@" - "$IMAGE" >/dev/null
echo "$IMAGE made ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
