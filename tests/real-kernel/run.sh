#!/usr/bin/env bash
# Real-kernel test: runs the project's own binaries against Linux's VFIO migration v2 uAPI,
# with the mtty sample driver, inside a QEMU (TCG) guest booting Debian's 6.12 kernel.
#   part 1  vfio-kernel-check: every FSM arc, the streams, PRE_COPY and DMA logging through
#           the project's uAPI layer;
#   part 2  mtty-vmm: a VMM hands a 1-port and a 2-port mtty device to a source vfio-migd and
#           fresh ones to a destination vfio-migd; vfio-migctl migrates the group over
#           loopback (after a corrupted and a truncated stream were rejected), and the VMM
#           reads every register and FIFO byte back through the BARs.
# Nothing is installed into the host's /boot or /lib/modules: the kernel packages are
# unpacked into a cache outside the clone and reused by later runs.
#
# Runs as root (apt-get, mknod-free initramfs). Environment:
#   VFIO_MIGD_CACHE               kernel/mtty cache   (default /var/cache/vfio-migd-real-kernel)
#   VFIO_MIGD_QEMU_TIMEOUT        seconds for the guest (default 300; a pass takes ~30 s)
# The verdict comes from the guest's serial log only: QEMU exits 0 whatever happens inside.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache_root=${VFIO_MIGD_CACHE:-/var/cache/vfio-migd-real-kernel}
qemu_timeout=${VFIO_MIGD_QEMU_TIMEOUT:-300}
work=$repo/target/real-kernel
# Binaries packed into the guest, and the package each comes from.
declare -A guest_bins=(
    [vfio-kernel-check]=vfio-migd-tests
    [mtty-vmm]=vfio-migd-tests
    [vfio-migd]=vfio-migd
    [vfio-migctl]=vfio-migctl
)
verdict_tag='@@vfio-migd-real-kernel-verdict@@'

log() { printf '== real-kernel: %s\n' "$*"; }
die() { printf '== real-kernel: FAILED: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, unpacking kernel packages)"

# --- 1. host packages --------------------------------------------------------------------
apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -q >/dev/null
        apt_updated=1
    fi
}

host_packages=(qemu-system-x86 busybox-static cpio gcc-12 make libc6-dev pahole kmod xz-utils)
missing=()
for pkg in "${host_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
# python3 reads cargo's JSON messages (step 4); any python3 on PATH will do.
command -v python3 >/dev/null || missing+=(python3)
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_update_once
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. Debian's 6.12 kernel, resolved, fetched and unpacked into the cache ---------------
# The 6.12 kernels of bookworm live only in bookworm-security. If no apt source carries
# that suite, derive one from the machine's own Debian mirror (same host, "-security").
apt_source_files() {
    find /etc/apt/sources.list /etc/apt/sources.list.d -maxdepth 1 -type f \
        \( -name sources.list -o -name '*.list' -o -name '*.sources' \) 2>/dev/null
}
ensure_security_suite() {
    local files
    mapfile -t files < <(apt_source_files)
    [[ ${#files[@]} -gt 0 ]] || die "no apt sources"
    if grep -qs 'bookworm-security' "${files[@]}"; then
        return
    fi
    local mirror
    mirror=$(grep -hoE '(https?|file)://[^ ]+/debian/?( |$)' "${files[@]}" | head -n1 | tr -d ' ' || true)
    [[ -n $mirror ]] || die "no Debian mirror in the apt sources to derive bookworm-security from"
    mirror=${mirror%/}
    log "adding bookworm-security (${mirror}-security) to the apt sources"
    printf 'deb %s-security bookworm-security main\n' "$mirror" \
        >/etc/apt/sources.list.d/vfio-migd-bookworm-security.list
    apt_updated=0
}

resolve_abi() {
    apt-cache depends linux-image-6.12-amd64 2>/dev/null |
        sed -nE 's/^ *Depends: linux-image-(6\.12\.[^ ]+)-amd64$/\1/p' | head -n1
}

# One run at a time per cache: a second run waits instead of unpacking over the first.
mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9

ensure_security_suite
abi=$(resolve_abi)
if [[ -z $abi ]]; then
    apt_update_once
    abi=$(resolve_abi)
fi
[[ -n $abi ]] || die "cannot resolve linux-image-6.12-amd64 (is bookworm-security reachable?)"

kdir=$cache_root/$abi
root=$kdir/root
kernel_packages=(
    "linux-image-$abi-amd64-unsigned"
    "linux-headers-$abi-amd64"
    "linux-headers-$abi-common"
    "linux-kbuild-$abi"
)

fetch_kernel() {
    local debs=$kdir/debs version
    rm -rf "$debs" "$root"
    mkdir -p "$debs" "$root"
    # linux-source-6.12 carries several versions: take the one built with this ABI.
    version=$(apt-cache show "linux-image-$abi-amd64-unsigned" | sed -n 's/^Version: //p' | head -n1)
    [[ -n $version ]] || return 1
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root \
        "${kernel_packages[@]/%/=$version}" "linux-source-6.12=$version" >/dev/null) || return 1
    local deb
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    rm -rf "$debs"
}

if [[ ! -e $kdir/.unpacked ]]; then
    log "fetching kernel $abi into $kdir"
    if ! fetch_kernel; then
        # Stale package lists name files the mirror no longer has: refresh and re-resolve.
        [[ $apt_updated -eq 0 ]] || die "cannot download the kernel packages for $abi"
        apt_update_once
        abi=$(resolve_abi)
        kdir=$cache_root/$abi
        root=$kdir/root
        kernel_packages=("linux-image-$abi-amd64-unsigned" "linux-headers-$abi-amd64"
            "linux-headers-$abi-common" "linux-kbuild-$abi")
        [[ -e $kdir/.unpacked ]] || fetch_kernel || die "cannot download the kernel packages for $abi"
    fi
    touch "$kdir/.unpacked"
else
    log "kernel $abi cached in $kdir"
fi

kernel_release=$abi-amd64
vmlinuz=$root/boot/vmlinuz-$kernel_release
moddir=$root/lib/modules/$kernel_release
[[ -f $vmlinuz ]] || die "no $vmlinuz in the unpacked image package"

# --- 3. mtty.ko, built out of tree against the unpacked headers --------------------------
mtty_dir=$kdir/mtty
if [[ ! -f $mtty_dir/mtty.ko ]]; then
    log "building mtty.ko"
    # Built aside and moved into place, so an interrupted build is never taken for a cached one.
    build=$kdir/mtty.build
    rm -rf "$mtty_dir" "$build"
    mkdir -p "$build"
    tarball=$(find "$root/usr/src" -maxdepth 1 -name 'linux-source-6.12.tar.*' -print -quit)
    [[ -n $tarball ]] || die "linux-source-6.12 tarball missing from $root/usr/src"
    tar -xf "$tarball" -C "$build" --strip-components=3 linux-source-6.12/samples/vfio-mdev/mtty.c
    echo 'obj-m := mtty.o' >"$build/Kbuild"
    # The headers' Makefile includes the -common tree (and kbuild) by absolute /usr/src
    # path; point it into the unpacked root instead.
    headers=$root/usr/src/linux-headers-$kernel_release
    sed -i "s|^include /usr/src/|include $root/usr/src/|" "$headers/Makefile"
    make -s -C "$headers" M="$build" CC=gcc-12 modules >"$build/build.log" 2>&1 ||
        { cat "$build/build.log" >&2; die "mtty.ko build failed"; }
    mv "$build" "$mtty_dir"
fi

# --- 4. guest binaries --------------------------------------------------------------------
# The guest runs the binaries `cargo test --workspace` builds anyway (after the README's
# test command this step compiles nothing), with their shared libraries packed beside
# them. A separate static (+crt-static) build would recompile every dependency: 10-20 min
# on 2 cores in CI, for binaries that move a few hundred bytes of device state.
log "building guest binaries (${!guest_bins[*]}) with the test build"
executables=$(cd "$repo" && cargo test --workspace --no-run --quiet --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and "bin" in message["target"]["kind"] and not message["profile"]["test"]:
        print(message["target"]["name"], message["executable"])
')
declare -A guest_exe=()
while read -r name path; do guest_exe[$name]=$path; done <<<"$executables"
for bin in "${!guest_bins[@]}"; do
    [[ -n ${guest_exe[$bin]:-} ]] || die "the test build produced no \`$bin\` (package ${guest_bins[$bin]})"
done

# --- 5. initramfs --------------------------------------------------------------------------
mkdir -p "$work"
stage=$work/initramfs
rm -rf "$stage"
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,modules}
cp /bin/busybox "$stage/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ -e $stage/bin/$applet ]] || ln -s busybox "$stage/bin/$applet"
done
declare -A guest_libs=()
for bin in "${!guest_bins[@]}"; do
    # Debug info is of no use in the guest and would make the initramfs many times larger.
    strip --strip-debug -o "$stage/bin/$bin" "${guest_exe[$bin]}"
    for lib in $(ldd "${guest_exe[$bin]}" | grep -oE '/[^ ]+'); do guest_libs[$lib]=1; done
done
# The loader and libraries at the paths the binaries name (the interpreter path is baked
# into each ELF; the rest are found in the loader's built-in multiarch directories).
for lib in "${!guest_libs[@]}"; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done

# Modules in dependency order (the package ships no modules.dep): resolve each module's
# `depends` recursively, skipping what is built into the kernel.
declare -A module_seen=()
module_order=()
find_module() {
    find "$moddir" "$mtty_dir" \( -name "$1.ko" -o -name "$1.ko.xz" -o \
        -name "${1//_/-}.ko" -o -name "${1//_/-}.ko.xz" \) -print -quit
}
add_module() {
    local name=$1 file dep
    [[ -z ${module_seen[$name]:-} ]] || return 0
    module_seen[$name]=1
    file=$(find_module "$name")
    if [[ -z $file ]]; then
        grep -qE "/${name//_/[_-]}\.ko$" "$moddir/modules.builtin" 2>/dev/null && return 0
        die "module $name: neither a .ko nor built in"
    fi
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do
        add_module "$dep"
    done
    case $file in
        *.xz) xz -dc "$file" >"$stage/modules/$name.ko" ;;
        *) cp "$file" "$stage/modules/$name.ko" ;;
    esac
    module_order+=("$name")
}
for module in vfio vfio_iommu_type1 mdev mtty; do
    add_module "$module"
done
log "guest modules: ${module_order[*]}"

# Part 1: two mdevs of each type, a saving source and a resuming destination of the same type.
mtty1_a=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001
mtty1_b=83b8f4f2-509f-382f-3c1e-e6bfe0fa1002
mtty2_a=83b8f4f2-509f-382f-3c1e-e6bfe0fa2001
mtty2_b=83b8f4f2-509f-382f-3c1e-e6bfe0fa2002
# Part 2: fresh devices (mtty's reset keeps UART registers, and part 1 loads state into its
# destinations): the migrating VM's 1-port and 2-port device, and their destinations.
vm_mtty1_src=83b8f4f2-509f-382f-3c1e-e6bfe0fa1101
vm_mtty1_dst=83b8f4f2-509f-382f-3c1e-e6bfe0fa1102
vm_mtty2_src=83b8f4f2-509f-382f-3c1e-e6bfe0fa2101
vm_mtty2_dst=83b8f4f2-509f-382f-3c1e-e6bfe0fa2102

cat >"$stage/init" <<EOF
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# The kernel starts init without PATH; the programs below spawn vfio-migd and vfio-migctl.
export PATH=/bin
verdict=FAIL
finish() {
    echo '@@dmesg-begin@@'
    dmesg
    echo '@@dmesg-end@@'
    echo "$verdict_tag \$verdict"
    poweroff -f
}
for m in ${module_order[*]}; do
    insmod /modules/\$m.ko || { echo "insmod \$m failed"; finish; }
done
types=/sys/class/mdev_bus/mtty/mdev_supported_types
for spec in mtty-1:$mtty1_a mtty-1:$mtty1_b mtty-2:$mtty2_a mtty-2:$mtty2_b \\
    mtty-1:$vm_mtty1_src mtty-1:$vm_mtty1_dst mtty-2:$vm_mtty2_src mtty-2:$vm_mtty2_dst; do
    echo \${spec#*:} >\$types/\${spec%%:*}/create || { echo "cannot create \$spec"; finish; }
done
ip link set lo up
part1=FAIL
part2=FAIL
kernel=FAIL
echo '@@guest-program-begin@@'
if vfio-kernel-check mtty-1:$mtty1_a mtty-1:$mtty1_b mtty-2:$mtty2_a mtty-2:$mtty2_b; then
    part1=PASS
fi
echo '@@guest-program-end@@'
echo '@@guest-migration-begin@@'
if mtty-vmm mtty-1:$vm_mtty1_src mtty-1:$vm_mtty1_dst mtty-2:$vm_mtty2_src mtty-2:$vm_mtty2_dst; then
    part2=PASS
fi
echo '@@guest-migration-end@@'
if dmesg | grep -qE 'WARNING|BUG|Oops'; then
    echo 'FAIL guest kernel log: WARNING/BUG/Oops after both parts'
else
    echo 'ok guest kernel log: no WARNING/BUG/Oops after both parts'
    kernel=PASS
fi
if [ \$part1 = PASS ] && [ \$part2 = PASS ] && [ \$kernel = PASS ]; then
    verdict=PASS
fi
finish
EOF
chmod +x "$stage/init"
initramfs=$work/initramfs.cpio
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0) >"$initramfs"

# --- 6. boot and verdict ----------------------------------------------------------------
serial=$work/serial.log
log "booting $kernel_release under TCG (serial log: $serial)"
rc=0
boot_started=$SECONDS
timeout --kill-after=10 "$qemu_timeout" qemu-system-x86_64 -accel tcg -cpu max -m 512 -smp 1 \
    -nographic -no-reboot -nodefaults -serial "file:$serial" -display none \
    -kernel "$vmlinuz" -initrd "$initramfs" \
    -append 'console=ttyS0 panic=-1 quiet' </dev/null >"$work/qemu.out" 2>&1 || rc=$?
[[ $rc -ne 124 && $rc -ne 137 ]] || log "QEMU timed out after ${qemu_timeout}s"
guest_seconds=$((SECONDS - boot_started))

clean=$work/serial.txt
tr -d '\r' <"$serial" >"$clean"
# The console may prefix the first line with terminal escapes: match markers unanchored.
section() { sed -n "/@@$1-begin@@\$/,/^@@$1-end@@\$/p" "$clean"; }

failures=()
grep -qx "$verdict_tag PASS" "$clean" || failures+=("no PASS verdict from the guest")
# Each part prints one line per check and a final count line.
declare -A summaries=()
for part in guest-program guest-migration; do
    output=$(section "$part")
    if grep -q '^FAIL ' <<<"$output"; then failures+=("$part reported failed checks"); fi
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' <<<"$output" | tail -n1 || true)
    summaries[$part]=$summary
    if [[ -z $summary ]]; then
        failures+=("$part printed no count line")
    elif [[ ! $summary =~ ^[1-9][0-9]*\ passed,\ 0\ failed$ ]]; then
        failures+=("$part: $summary")
    fi
done
grep -qx 'ok guest kernel log: no WARNING/BUG/Oops after both parts' "$clean" ||
    failures+=("the guest's own kernel log check did not pass")
program=$(section guest-program)
migration=$(section guest-migration)
kernel_log=$(section dmesg)
[[ -n $kernel_log ]] || failures+=("no dmesg in the serial log")
if grep -qE 'WARNING|BUG|Oops' <<<"$kernel_log"; then failures+=("the kernel log has WARNING/BUG/Oops"); fi

if [[ ${#failures[@]} -gt 0 ]]; then
    {
        echo "---- QEMU output ($work/qemu.out)"
        tail -n 20 "$work/qemu.out"
        echo "---- guest program (part 1)"
        printf '%s\n' "$program"
        echo "---- guest migration (part 2)"
        printf '%s\n' "$migration"
        echo "---- kernel problems"
        grep -nE -B2 -A20 'WARNING|BUG|Oops' <<<"$kernel_log" | head -n 80 || true
        echo "---- serial log tail ($serial)"
        tail -n 60 "$clean"
    } >&2
    for failure in "${failures[@]}"; do printf '== real-kernel: FAIL: %s\n' "$failure" >&2; done
    exit 1
fi

printf '%s\n' "$program" "$migration" | grep -vE '@@guest-(program|migration)-(begin|end)@@$'
grep -x 'ok guest kernel log: .*' "$clean"
log "PASS (part 1: ${summaries[guest-program]}; part 2: ${summaries[guest-migration]}; \
guest ${guest_seconds}s; kernel $kernel_release; serial log $serial)"
