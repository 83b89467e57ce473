#!/usr/bin/env bash
# Build the CPU serving image with podman, offline apart from the Debian mirror for the base:
#   1. base: a Debian 12 root file system made by debootstrap (no registry needed), imported once;
#   2. wheelhouse: the pinned wheels of requirements/image.txt (pip download);
#   3. podman build deploy/images/Containerfile.cpu, the repository REPOSITORY baked in at /models.
# Called by `make image`; every setting comes from the environment (mk/ship.mk sets them).
set -euo pipefail

IMAGE=${IMAGE:-localhost/triton-image-classifier:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/triton-ic-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
REPOSITORY=${REPOSITORY:-model_repository}
WORK=${WORK:-.run/image-build}
PY=${PY:-.venv/bin/python}
PODMAN=${PODMAN:-podman}
# podman's defaults (crun, rlimits above the caller's) fail in some sandboxes; PODMAN_ARGS and
# PODMAN_BUILD_ARGS let the caller pass --runtime runc and --ulimit (mk/ship.mk).
read -r -a PODMAN_ARGS <<< "${PODMAN_ARGS:-}"
read -r -a BUILD_ARGS <<< "${PODMAN_BUILD_ARGS:-}"

say() { echo "make image: $*" >&2; }

command -v "$PODMAN" >/dev/null || { say "no podman (apt-get install podman buildah runc)"; exit 2; }
[ -f "$REPOSITORY/BUILD.json" ] || { say "no built repository at $REPOSITORY (make engines first)"; exit 2; }
mkdir -p "$WORK"

# When the base's packages were brought up to date with bookworm-security and bookworm-updates (a label); a base
# without it (made before these were applied) is made again, as is any with REFRESH_BASE=1.
UPGRADED_LABEL=io.triton-ic.base.upgraded
upgraded=$("$PODMAN" "${PODMAN_ARGS[@]}" image inspect --format "{{index .Labels \"$UPGRADED_LABEL\"}}" "$BASE_IMAGE" \
           2>/dev/null || true)
[ "$upgraded" = "<no value>" ] && upgraded=
if [ -z "$upgraded" ] || [ -n "${REFRESH_BASE:-}" ]; then
    command -v debootstrap >/dev/null || { say "no debootstrap (apt-get install debootstrap)"; exit 2; }
    [ "$(id -u)" = 0 ] || { say "debootstrap needs root"; exit 2; }
    say "base: debootstrap Debian 12 (bookworm, minbase + python3) from $MIRROR, then bookworm-security and -updates"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11 bookworm "$WORK/rootfs" "$MIRROR" \
        > "$WORK/debootstrap.log"
    # debootstrap installs from bookworm alone: the point release, without the security fixes since
    rm -f "$WORK/rootfs/etc/apt/sources.list"
    cat > "$WORK/rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    mount -t proc proc "$WORK/rootfs/proc"
    trap 'umount "$WORK/rootfs/proc" 2>/dev/null || true' EXIT
    chroot "$WORK/rootfs" env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get update -q && apt-get upgrade -y -q --no-install-recommends && apt-get clean' >> "$WORK/debootstrap.log"
    umount "$WORK/rootfs/proc"
    trap - EXIT
    rm -rf "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/var/cache/apt/"*.bin
    upgraded=$(date -u +%Y-%m-%dT%H:%MZ)
    tar -C "$WORK/rootfs" -c . | "$PODMAN" "${PODMAN_ARGS[@]}" import --message "debootstrap bookworm minbase" \
        --change "LABEL $UPGRADED_LABEL=$upgraded" - "$BASE_IMAGE"
    rm -rf "$WORK/rootfs"
fi
say "base: $BASE_IMAGE, Debian updates as of $upgraded (make image REFRESH_BASE=1 applies newer ones)"

say "wheelhouse: requirements/image.txt"
rm -rf "$WORK/context" && mkdir -p "$WORK/context/requirements"
cp requirements/image.txt "$WORK/context/requirements/"
# The image is Debian 12 with Python 3.11, like the machines this runs on: wheels for this interpreter.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -r requirements/image.txt -d "$WORK/wheels"
cp -r "$WORK/wheels" "$WORK/context/wheels"
# what `make publish` would upload: no A/B candidates, retired versions or model-control lock
"$PY" -m serving.publish --model-repository "$REPOSITORY" --folder "$WORK/context/repository" >/dev/null
# serving.supervise (the entrypoint) and the modules it imports: standard library, psutil, prometheus_client and
# aiohttp (its HTTP guard); serving.pull (the Deployment's initContainer) and its one import: standard library and boto3
mkdir -p "$WORK/context/serving"
cp serving/__init__.py serving/access.py serving/cache.py serving/health.py serving/probe_metrics.py serving/stubs.py \
    serving/triton_admin.py serving/watchdog.py serving/supervise.py serving/http_guard.py serving/publication.py \
    serving/pull.py "$WORK/context/serving/"

say "podman build $IMAGE"
"$PODMAN" "${PODMAN_ARGS[@]}" build "${BUILD_ARGS[@]}" --build-arg "BASE=$BASE_IMAGE" \
    -f deploy/images/Containerfile.cpu -t "$IMAGE" "$WORK/context"
"$PODMAN" "${PODMAN_ARGS[@]}" image inspect --format '{{.Id}} {{.Size}}' "$IMAGE"
say "$("$PY" -m build.repository.placement --model-repository "$REPOSITORY")"
