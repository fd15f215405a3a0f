#!/usr/bin/env bash
# Build deploy/Containerfile where no CUDA base image can be pulled (this project's
# development machines reach only the PyPI and Debian mirrors), then run the image.
#
# The base is a Debian bookworm made here with debootstrap instead of the CUDA runtime
# image, torch the CPU build from a local wheel directory; everything else (the package,
# the C parts, the user, the entry point) is exactly the Containerfile's. Then, inside the
# image as its own user: poold --version, poold --check-config, and poold --demo serving a
# request to pool-ctl. Needs root, buildah, debootstrap. Minutes, not part of the suite.
#
#   sudo deploy/test-image.sh [WHEEL_DIR (default /opt/wheels)]
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-/opt/wheels}
BASE=localhost/gpu-pool-testbase:bookworm
IMAGE=localhost/gpu-pool:test
WORK=${TMPDIR:-/tmp}/gpu-pool-image-test
# RUN steps in a chroot: works inside containers and VMs whose cgroups crun cannot drive
# ("cgroups in hybrid mode not supported"); set BUILDAH_ISOLATION=oci where it can.
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
mkdir -p "$WORK"
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$WORK/rootfs/." "$mnt/"
  buildah umount "$ctr"
  buildah commit --rm "$ctr" "$BASE"
fi
torch=$(cd "$WHEELS" && ls torch-*cp311*.whl | head -1)
version=${torch#torch-}; version=${version%%-*}
# This machine's CA bundle too: its way to PyPI may go through a TLS-inspecting proxy.
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
buildah build --layers --network host -v "$WHEELS:/wheels:ro" -v "$CA:/build-ca.crt:ro" \
  -f deploy/Containerfile --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_SPEC="torch==$version" \
  --build-arg TORCH_INDEX_URL= --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_CA_BUNDLE=/build-ca.crt \
  -t "$IMAGE" .
echo "--- built $IMAGE; running it"
ctr=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null' EXIT
cat > "$WORK/pool.toml" <<'TOML'
[pool]
frontend = "tcp://127.0.0.1:5555"
control = "ipc:///tmp/ctl/control.sock"
state_dir = "/var/lib/gpu-pool"
TOML
buildah copy --chown 10001:10001 "$ctr" "$WORK/pool.toml" /tmp/pool.toml >/dev/null
run() { buildah run --user 10001:10001 "$ctr" -- "$@"; }
run id
run poold --version
run pool-ctl --version
run poold --check-config /tmp/pool.toml
run sh -c 'poold --demo & pid=$!; rc=1; for i in $(seq 180); do
    if pool-ctl health >/dev/null 2>&1; then rc=0; break; fi; sleep 1; done
  [ $rc = 0 ] && pool-ctl status && python -c "
import numpy as np
from router.client import Client
r = Client(\"tcp://127.0.0.1:5555\").infer(\"demo\", np.zeros((1, 16), np.float32), timeout=30)
print(\"answered by version\", r.version, r.outputs[0].shape)" || rc=1
  kill -TERM $pid; wait $pid; exit $rc'
echo "--- image OK: $IMAGE"
