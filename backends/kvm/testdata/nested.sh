#!/usr/bin/env bash
# nested.sh: run the KVM backend's tests on a host without a usable /dev/kvm,
# under nested KVM inside a QEMU TCG guest (an emulated AMD CPU with SVM, so
# the guest kernel's kvm_amd provides /dev/kvm). Correctness only: every
# figure measured this way is the emulator's, not a real host's.
#
#   backends/kvm/testdata/nested.sh [go test flags...]    e.g. -test.run TestTrap -test.v
#
# Needs Debian's qemu-system-x86, linux-image-amd64, busybox-static and cpio
# (apt-get install -y --no-install-recommends qemu-system-x86 linux-image-amd64 busybox-static cpio),
# or, without installing a kernel: KDIR=a directory where a linux-image-*-amd64
# package was unpacked (apt-get download, dpkg -x: KDIR/boot, KDIR/lib/modules)
# and BUSYBOX=a static busybox binary.
# The inner KVM uses shadow paging (kvm_amd npt=0, like kvm_pvm; KVMAMD="" for
# nested paging): with TCG's emulated NPT a guest read once returned the contents
# of a page-table page instead of the stack page it addressed (an emulator bug,
# as far as we could tell). One emulated CPU by default (SMP=1): with SMP=2 the
# guest kernel soft-locked (both CPUs stuck, RCU stalls) in 3 of 4 whole-package
# runs on our 2-core machines, on main's code as well; SMP=1 passed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kdir=${KDIR:-}
busybox=${BUSYBOX:-/bin/busybox}
kver=$(ls "$kdir/lib/modules" | sort -V | tail -1)
kernel=$kdir/boot/vmlinuz-$kver
mods=$kdir/lib/modules/$kver/kernel
for f in "$kernel" "$busybox" "$mods/arch/x86/kvm/kvm-amd.ko"; do
  [ -e "$f" ] || [ -e "$f.xz" ] || { echo "nested.sh: $f missing (see the header for the packages)" >&2; exit 2; }
done
command -v qemu-system-x86_64 >/dev/null || { echo "nested.sh: qemu-system-x86_64 missing" >&2; exit 2; }

(cd "$here" && CGO_ENABLED=0 go test -c -o "$work/root/test" .)
mkdir -p "$work/root"/{bin,dev,proc,sys,tmp,mod}
cp "$busybox" "$work/root/bin/busybox"
for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm-amd.ko; do
  if [ -e "$mods/$m" ]; then cp "$mods/$m" "$work/root/mod/"; elif [ -e "$mods/$m.xz" ]; then xz -dc "$mods/$m.xz" > "$work/root/mod/$(basename "$m")"; fi
done
printf '%s\n' "$@" > "$work/root/args"
cat > "$work/root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in irqbypass kvm ccp; do [ -e /mod/\$m.ko ] && insmod /mod/\$m.ko; done
insmod /mod/kvm-amd.ko ${KVMAMD-npt=0}
cd /tmp
VASENGINE_REQUIRE_KVM=1 /test \$(cat /args)
echo "nested.sh: exit status \$?"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")
timeout "${TIMEOUT:-1500}" qemu-system-x86_64 -accel tcg -cpu max -smp "${SMP:-1}" -m 2048 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 panic=-1 quiet rdinit=/init" 2>&1 | tee "$work/log" | tr -d '\r'
grep -q "nested.sh: exit status 0" "$work/log"
