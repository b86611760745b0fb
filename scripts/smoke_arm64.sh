#!/usr/bin/env bash
# ARM64 smoke test of the device runtime, run on an x86-64 Linux host under qemu-user.
#
#   sudo scripts/smoke_arm64.sh                   # both CPU models
#   sudo scripts/smoke_arm64.sh --cpus cortex-a72 # one model
#   sudo scripts/smoke_arm64.sh --rootfs-only     # build/refresh the cached rootfs and stop
#   sudo scripts/smoke_arm64.sh --rebuild-rootfs  # ignore the cached rootfs tarball
#   sudo scripts/smoke_arm64.sh --sigill-selftest # plus one SDOT: must fail on cortex-a72
#   sudo scripts/smoke_arm64.sh --measure FILE [--measure-args ARGS]
#                                                 # run python FILE --measure-only in each pass
#
# What it does (details in docs/arm64-smoke.md):
#   1. installs the host tools it needs from Debian (qemu-user-static, debootstrap,
#      binfmt-support, zstd) when they are missing, and makes sure binfmt_misc runs aarch64
#      ELF files through qemu with the 'F' flag (so the handler works inside a chroot);
#   2. builds an arm64 Debian bookworm rootfs with debootstrap, or unpacks the cached
#      .cache/arm64/rootfs-bookworm-arm64.tar.zst;
#   3. exports a tiny bundle on the host and runs the smoke cases on the host first
#      (the reference);
#   4. for each CPU model (QEMU_CPU=cortex-a72, cortex-a76): chroots into this run's fresh
#      rootfs, creates a venv of its own, pip-installs the project's wheel with the [runtime]
#      extra from PyPI's aarch64 wheels (fetched once into .cache/arm64/pip, bind-mounted
#      read-only), and runs the same cases;
#   5. compares the generated tokens with the host's, token for token, and reports any
#      crash (SIGILL = an instruction the emulated CPU lacks) with the CPU model's name.
# Exit status: 0 when every pass ran and matched the host; 1 otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The cache (rootfs tarball, aarch64 wheels, last run) lives in the project's ignored
# .cache/arm64; SMOKE_ARM64_CACHE moves it (e.g. to a folder a CI machine keeps).
CACHE=${SMOKE_ARM64_CACHE:-$ROOT/.cache/arm64}
SUITE=bookworm
MIRROR=${SMOKE_ARM64_MIRROR:-http://deb.debian.org/debian}
TARBALL="$CACHE/rootfs-$SUITE-arm64.tar.zst"
HOST_PY=${SMOKE_ARM64_HOST_PYTHON:-$ROOT/.venv/bin/python}
CPUS="cortex-a72 cortex-a76"
REBUILD=0
ROOTFS_ONLY=0

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
SIGILL_SELFTEST=0
# --measure: instead of the smoke cases, each pass runs this Python file with the device
# install (benchmarks/arm_paths.py: `make bench-arm-paths`); no bundle, no host reference.
MEASURE="" MEASURE_ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) CPUS=$2; shift 2 ;;
        --rebuild-rootfs) REBUILD=1; shift ;;
        --rootfs-only) ROOTFS_ONLY=1; shift ;;
        --sigill-selftest) SIGILL_SELFTEST=1; shift ;;
        --measure) MEASURE=$(realpath "$2"); shift 2 ;;
        --measure-args) MEASURE_ARGS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "smoke-arm64: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

log() { printf '[smoke-arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[smoke-arm64] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }
TIMINGS=()
timing() { TIMINGS+=("$(printf '%-40s %5ss' "$1" "$2")"); }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts): run it with sudo"
[ "$(uname -m)" = x86_64 ] || log "host is $(uname -m), not x86_64: running anyway"
[ -x "$HOST_PY" ] || die "host venv python not found at $HOST_PY (run 'make install' first)"

# ---------------------------------------------------------------- 1. host tools and binfmt
ensure_host_packages() {
    local missing=()
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    command -v zstd >/dev/null || missing+=(zstd)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing host packages: ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

QEMU_BIN=/usr/bin/qemu-aarch64-static
AARCH64_MAGIC='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
AARCH64_MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'

ensure_binfmt() {
    local d=/proc/sys/fs/binfmt_misc
    if [ ! -e "$d/register" ]; then
        log "mounting binfmt_misc"
        mount -t binfmt_misc binfmt_misc "$d"
    fi
    [ "$(cat "$d/status")" = enabled ] || echo 1 >"$d/status"
    # Debian's qemu-user-static registers qemu-aarch64 through binfmt-support with flags PF;
    # without a running binfmt-support service (containers) enable it by hand.
    if [ ! -e "$d/qemu-aarch64" ] && command -v update-binfmts >/dev/null; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    # 'F' (fix binary) opens the interpreter at registration time, so it also works inside
    # the chroot where /usr/bin/qemu-aarch64-static does not exist.
    if [ ! -e "$d/qemu-aarch64" ] || ! grep -q '^flags:.*F' "$d/qemu-aarch64"; then
        [ -e "$d/qemu-aarch64" ] && echo -1 >"$d/qemu-aarch64"
        log "registering qemu-aarch64 binfmt handler (flags PF)"
        printf ':qemu-aarch64:M::%s:%s:%s:PF' "$AARCH64_MAGIC" "$AARCH64_MASK" "$QEMU_BIN" \
            >"$d/register"
    fi
    grep -q '^enabled' "$d/qemu-aarch64" || echo 1 >"$d/qemu-aarch64"
    log "binfmt: $(tr '\n' ' ' <"$d/qemu-aarch64" | cut -c1-90)"
}

# ---------------------------------------------------------------- 2. rootfs
WORK="$CACHE/run"
ROOTFS="$WORK/rootfs"
MOUNTS=()

mounted_under() { findmnt -rn -o TARGET | grep -E "^$1(/|$)" || true; }

cleanup_mounts() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true
    done
    MOUNTS=()
}
trap cleanup_mounts EXIT
trap 'cleanup_mounts; exit 130' INT TERM

safe_rm_tree() {
    # Never delete through a live bind mount (/dev, /proc of the host).
    local left
    left=$(mounted_under "$1")
    [ -z "$left" ] || die "refusing to delete $1: still mounted: $left"
    rm -rf --one-file-system "$1"
}

build_rootfs() {
    local dir="$CACHE/build-rootfs" t0
    t0=$(now)
    safe_rm_tree "$dir"
    log "debootstrap --arch=arm64 $SUITE (first run: several minutes under emulation)"
    # binfmt is registered, so debootstrap runs the second stage itself through qemu.
    if ! debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -20 "$CACHE/debootstrap.log" >&2
        die "debootstrap failed (full log: $CACHE/debootstrap.log)"
    fi
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*_Packages
    log "packing $TARBALL"
    tar --numeric-owner -C "$dir" -cf - . | zstd -q -T0 -6 -o "$TARBALL.tmp"
    mv -f "$TARBALL.tmp" "$TARBALL"
    safe_rm_tree "$dir"
    timing "rootfs build (debootstrap + pack)" $(($(now) - t0))
}

unpack_rootfs() {
    local t0
    t0=$(now)
    safe_rm_tree "$ROOTFS"
    mkdir -p "$ROOTFS"
    if [ -f "$TARBALL" ]; then
        zstd -q -d -c "$TARBALL" | tar --numeric-owner -C "$ROOTFS" -xf -
    else
        tar --numeric-owner -C "$ROOTFS" -xzf "${TARBALL%.zst}.gz"
    fi
    timing "rootfs unpack (cached)" $(($(now) - t0))
}

write_cpuinfo() {
    # qemu-user 7.2 shows aarch64 programs the host's x86 /proc/cpuinfo. The cpuinfo library
    # inside onnxruntime then crashes (SIGSEGV) on that mix with a real /sys. So, when the
    # emulator does not provide one, the pass gets the /proc/cpuinfo of the board it stands
    # for: Pi 4 (Cortex-A72 r0p3) or Pi 5 (Cortex-A76 r4p1), one entry per host CPU. The
    # instruction sets the programs see still come from the emulated CPU (HWCAP).
    local cpu=$1 out=$2 part variant revision features n i
    case "$cpu" in
        cortex-a72) part=0xd08 variant=0x0 revision=3 features="fp asimd evtstrm crc32 cpuid" ;;
        cortex-a76) part=0xd0b variant=0x4 revision=1
            features="fp asimd evtstrm crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) return 1 ;;
    esac
    n=$(getconf _NPROCESSORS_CONF)
    : >"$out"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
            "$i" "$features" "$variant" "$part" "$revision" >>"$out"
    done
}

mount_into_rootfs() {
    mkdir -p "$ROOTFS/proc" "$ROOTFS/dev" "$ROOTFS/sys" "$ROOTFS/smoke" \
        "$ROOTFS/root/.cache/pip"
    local cpu=$1
    mount -t proc proc "$ROOTFS/proc" && MOUNTS+=("$ROOTFS/proc")
    if ! QEMU_CPU=$cpu "$CHROOT" "$ROOTFS" /bin/grep -q '^CPU implementer' /proc/cpuinfo; then
        if write_cpuinfo "$cpu" "$WORK/cpuinfo-$cpu"; then
            mount --bind "$WORK/cpuinfo-$cpu" "$ROOTFS/proc/cpuinfo" \
                && MOUNTS+=("$ROOTFS/proc/cpuinfo")
            log "qemu shows the host's /proc/cpuinfo: using a $cpu one instead"
        fi
    fi
    mount --bind /dev "$ROOTFS/dev" && MOUNTS+=("$ROOTFS/dev")
    mount -t tmpfs -o size=512m tmpfs "$ROOTFS/dev/shm" && MOUNTS+=("$ROOTFS/dev/shm")
    mount --bind /sys "$ROOTFS/sys" && MOUNTS+=("$ROOTFS/sys")
    mount -o remount,bind,ro "$ROOTFS/sys"
    mount --bind "$CACHE/pip" "$ROOTFS/root/.cache/pip" && MOUNTS+=("$ROOTFS/root/.cache/pip")
    mount -o remount,bind,ro "$ROOTFS/root/.cache/pip"
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    # The host's CA bundle, so a TLS-inspecting proxy the host trusts is trusted inside too.
    cp -L "$HOST_CA" "$ROOTFS/etc/ssl/certs/host-ca-bundle.crt"
}

# ---------------------------------------------------------------- 3. wheels
PY_VER=3.11            # bookworm's python3
GLIBC_MINOR=36         # bookworm's glibc 2.36: manylinux_2_17 ... manylinux_2_36 wheels fit
WHEELHOUSE="$CACHE/pip/wheels-cp${PY_VER/./}-aarch64"

build_project_wheel() {
    # The project as a device installs it: a wheel of the working tree (tracked and not yet
    # tracked files alike), built from a clean copy so nothing is written into the checkout.
    local src="$WORK/src"
    rm -rf "$src" "$WORK/dist"
    mkdir -p "$src" "$WORK/dist"
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./build --exclude=./dist --exclude=./benchmarks/results \
        -cf - . | tar -C "$src" -xf -
    "$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$src" \
        >"$WORK/out/wheel.log" 2>&1 || { cat "$WORK/out/wheel.log" >&2; die "wheel build failed"; }
    ls "$WORK"/dist/coalora-*.whl
}

fill_wheelhouse() {
    # PyPI's aarch64 wheels for the [runtime] extra, fetched by the host's pip (native speed)
    # into the cache; pip inside the rootfs then installs from there with --no-index, so a
    # wheel that does not fit aarch64/cp311/glibc 2.36 is still refused by the device's pip.
    # Only PyPI (or PIP_INDEX_URL): this host's extra indexes, find-links and constraints
    # are left out.
    local wheel=$1 plats=() m
    for m in $(seq 17 "$GLIBC_MINOR"); do plats+=(--platform "manylinux_2_${m}_aarch64"); done
    mkdir -p "$WHEELHOUSE"
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        "$HOST_PY" -m pip download -q --only-binary=:all: --python-version "$PY_VER" \
        --implementation cp --abi "cp${PY_VER/./}" --abi abi3 --abi none \
        --platform manylinux2014_aarch64 "${plats[@]}" --platform any \
        -d "$WHEELHOUSE" "${wheel}[runtime]" >"$WORK/out/download.log" 2>&1 \
        || { tail -20 "$WORK/out/download.log" >&2; die "downloading the aarch64 wheels failed"; }
    rm -f "$WHEELHOUSE"/coalora-*.whl
}

# ---------------------------------------------------------------- main
T_ALL=$(now)
ensure_host_packages
ensure_binfmt
mkdir -p "$CACHE/pip" "$WORK"

if [ "$REBUILD" = 1 ] || { [ ! -f "$TARBALL" ] && [ ! -f "${TARBALL%.zst}.gz" ]; }; then
    build_rootfs
else
    log "reusing cached rootfs $(basename "$TARBALL") ($(du -h "$TARBALL" | cut -f1))"
fi
[ "$ROOTFS_ONLY" = 1 ] && { [ ${#TIMINGS[@]} -eq 0 ] || printf '%s\n' "${TIMINGS[@]}"; exit 0; }

rm -rf "$WORK/bundle" "$WORK/out"
mkdir -p "$WORK/out"
if [ -n "$MEASURE" ]; then
    [ -f "$MEASURE" ] || die "--measure: no file $MEASURE"
    mkdir -p "$WORK/bundle"  # unused in this mode
    log "measure mode: $(basename "$MEASURE") in each pass (no bundle, no host reference)"
else
log "exporting the tiny test bundle on the host"
t0=$(now)
(cd "$ROOT/tests" && "$HOST_PY" -c \
    "from bundles import build_llama_bundle; from pathlib import Path; \
build_llama_bundle(Path('$WORK/bundle'))") >"$WORK/out/bundle-export.log" 2>&1 \
    || { tail -20 "$WORK/out/bundle-export.log" >&2; die "bundle export failed"; }
timing "bundle export (host)" $(($(now) - t0))

log "host reference run ($(uname -m))"
t0=$(now)
host_rc=0
bash "$ROOT/scripts/smoke_arm64_inside.sh" --label host --venv "$ROOT/.venv" \
    --bundle "$WORK/bundle" --out "$WORK/out/host" || host_rc=$?
timing "host reference cases" $(($(now) - t0))
[ "$host_rc" = 0 ] || die "the smoke cases fail on the host itself (exit $host_rc): fix that first"
fi

log "building the project wheel and fetching PyPI's aarch64 wheels into the cache"
t0=$(now)
WHEEL=$(build_project_wheel)
fill_wheelhouse "$WHEEL"
timing "wheel + aarch64 wheel download (host)" $(($(now) - t0))
CHROOT=$(command -v chroot || echo /usr/sbin/chroot)
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
# What reaches the chroot: the CPU model, a clean PATH, and the host's network settings.
PASS_ENV=(PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8
    PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1
    "SMOKE_ARM64_SIGILL_SELFTEST=$SIGILL_SELFTEST")
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL \
    PIP_DEFAULT_TIMEOUT; do
    [ -n "${!v:-}" ] && PASS_ENV+=("$v=${!v}")
done
FAILED=()
# One fresh rootfs per run; each CPU model gets its own venv in it (/opt/venv-<model>).
unpack_rootfs
mkdir -p "$ROOTFS/smoke"
cp -a "$WORK/dist" "$ROOTFS/smoke/dist"
cp -a "$WORK/bundle" "$ROOTFS/smoke/bundle"
cp "$ROOT/scripts/smoke_arm64_inside.sh" "$ROOTFS/smoke/inside.sh"
INSIDE_EXTRA=()
if [ -n "$MEASURE" ]; then
    cp "$MEASURE" "$ROOTFS/smoke/measure.py"
    INSIDE_EXTRA=(--measure /smoke/measure.py --measure-args "$MEASURE_ARGS")
fi
for cpu in $CPUS; do
    log "=== pass QEMU_CPU=$cpu ==="
    t0=$(now)
    mount_into_rootfs "$cpu"
    rc=0
    # QEMU_CPU is read by every qemu-aarch64 that binfmt starts for the chroot's processes.
    env -i QEMU_CPU="$cpu" "${PASS_ENV[@]}" "$CHROOT" "$ROOTFS" /bin/bash /smoke/inside.sh --label "$cpu" \
        --wheel "/smoke/dist/$(basename "$WHEEL")" \
        --wheelhouse "/root/.cache/pip/$(basename "$WHEELHOUSE")" \
        --venv "/opt/venv-$cpu" --bundle /smoke/bundle --out "/smoke/out/$cpu" \
        "${INSIDE_EXTRA[@]}" || rc=$?
    cleanup_mounts
    rm -rf "$WORK/out/$cpu"
    [ -d "$ROOTFS/smoke/out/$cpu" ] && cp -a "$ROOTFS/smoke/out/$cpu" "$WORK/out/$cpu"
    timing "pass $cpu (venv + pip + cases)" $(($(now) - t0))
    if [ "$rc" != 0 ]; then
        if [ "$rc" -gt 128 ]; then
            sig=$(kill -l $((rc - 128)) 2>/dev/null || echo "?")
            log "FAIL [$cpu]: the inside run was killed by SIG$sig (exit $rc)"
        else
            log "FAIL [$cpu]: the inside run exited $rc"
        fi
        [ -f "$WORK/out/$cpu/failures.txt" ] && sed "s/^/    [$cpu] /" "$WORK/out/$cpu/failures.txt"
        FAILED+=("$cpu")
    fi
done

if [ -z "$MEASURE" ]; then
    log "comparing generated tokens with the host"
    cmp_rc=0
    # shellcheck disable=SC2086  # CPUS is a space-separated list
    "$HOST_PY" "$ROOT/scripts/smoke_arm64_compare.py" "$WORK/out" host $CPUS || cmp_rc=$?
    [ "$cmp_rc" = 0 ] || FAILED+=("token-comparison")
fi

timing "total" $(($(now) - T_ALL))
echo
echo "timings:"
printf '  %s\n' "${TIMINGS[@]}"
for cpu in $CPUS; do
    [ -f "$WORK/out/$cpu/summary.txt" ] && sed "s/^/  [$cpu] /" "$WORK/out/$cpu/summary.txt"
done
# The rootfs stays until the next run, for a look inside (see docs/arm64-smoke.md).
if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED: ${FAILED[*]} (outputs kept in $WORK/out)"
    exit 1
fi
[ -n "$MEASURE" ] && { log "OK: measured on every CPU model"; exit 0; }
log "OK: every CPU model ran the runtime and matched the host token for token"
