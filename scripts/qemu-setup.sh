#!/bin/sh
# qemu-setup.sh [DIR]: everything the QEMU backend (backends/qemu) needs,
# cached in DIR, by default the backend's cache folder:
# $VASENGINE_QEMU_DIR, else $XDG_CACHE_HOME/vasengine/qemu, else
# $HOME/.cache/vasengine/qemu (vasengine's -qemu-dir flag points elsewhere).
# Idempotent: each step is skipped when its output is already there and up to
# date. Runs from any folder; several at once wait for each other (flock).
#
#   DIR/vmlinuz       Debian's 6.1 cloud kernel (linux-image-6.1.0-*-cloud-amd64-unsigned)
#   DIR/initrd.gz     busybox-static + backends/qemu/guest/init + /bin/rwx
#                     (backends/qemu/guest/rwx, built with go) (cpio newc, gzip)
#   DIR/ptstore.so    the page-table store plugin (make -C backends/qemu/plugin)
#
# Installs qemu-system-x86, cpio and gcc/make with apt-get when they are
# missing (needs root). Nothing it downloads is committed.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ge 1 ] && [ -n "$1" ]; then
	out=$1
elif [ -n "${VASENGINE_QEMU_DIR:-}" ]; then
	out=$VASENGINE_QEMU_DIR
else
	out="${XDG_CACHE_HOME:-${HOME:?neither XDG_CACHE_HOME nor HOME is set}/.cache}/vasengine/qemu"
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

# One setup at a time per folder (other worktrees share the cache).
if command -v flock >/dev/null && [ -z "${VASENGINE_QEMU_SETUP_LOCKED:-}" ]; then
	export VASENGINE_QEMU_SETUP_LOCKED=1
	exec flock "$out/.setup.lock" sh "$0" "$out"
fi

log() { echo "qemu-setup: $*" >&2; }

updated=
apt_install() {
	if [ "$(id -u)" != 0 ]; then
		log "need root to apt-get install $*"
		exit 1
	fi
	if [ -z "$updated" ]; then
		apt-get update -qq
		updated=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v cpio >/dev/null || need="$need cpio"
command -v gzip >/dev/null || need="$need gzip"
command -v gcc >/dev/null || need="$need gcc libc6-dev"
command -v make >/dev/null || need="$need make"
if [ -n "$need" ]; then
	log "installing$need"
	# shellcheck disable=SC2086
	apt_install $need
fi

# fetch PKG DIR: apt-get download PKG and unpack it into DIR.
fetch() {
	tmp=$(mktemp -d "$out/tmp.XXXXXX")
	mkdir -p "$tmp/x"
	if ! (cd "$tmp" && apt-get download -qq "$1" 2>/dev/null); then
		[ -n "$updated" ] || { apt-get update -qq; updated=1; }
		(cd "$tmp" && apt-get download -qq "$1")
	fi
	dpkg -x "$tmp"/*.deb "$tmp/x"
	mv "$tmp/x" "$2"
	rm -rf "$tmp"
}

if [ ! -s "$out/vmlinuz" ]; then
	pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
		awk '{print $1}' | sort -V | tail -n 1)
	if [ -z "$pkg" ]; then
		[ -n "$updated" ] || { apt-get update -qq; updated=1; }
		pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
			awk '{print $1}' | sort -V | tail -n 1)
	fi
	[ -n "$pkg" ] || { log "no linux-image-6.1.0-*-cloud-amd64-unsigned package found"; exit 1; }
	log "downloading $pkg"
	rm -rf "$out/kernel"
	fetch "$pkg" "$out/kernel"
	cp "$out"/kernel/boot/vmlinuz-* "$out/vmlinuz.tmp"
	echo "$pkg" >"$out/kernel.version"
	rm -rf "$out/kernel"
	mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi

if [ ! -x "$out/busybox" ]; then
	log "downloading busybox-static"
	rm -rf "$out/bb"
	fetch busybox-static "$out/bb"
	cp "$out/bb/bin/busybox" "$out/busybox"
	rm -rf "$out/bb"
fi

init="$root/backends/qemu/guest/init"
rwx="$root/backends/qemu/guest/rwx/main.go"
if [ ! -s "$out/initrd.gz" ] || [ "$init" -nt "$out/initrd.gz" ] || [ "$rwx" -nt "$out/initrd.gz" ] || [ "$out/busybox" -nt "$out/initrd.gz" ]; then
	log "building initrd.gz"
	st=$(mktemp -d "$out/initramfs.XXXXXX")
	mkdir -p "$st/bin" "$st/dev" "$st/proc" "$st/sys" "$st/tmp"
	cp "$out/busybox" "$st/bin/busybox"
	cp "$init" "$st/init"
	(cd "$root" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 "${GO:-go}" build -trimpath -ldflags=-s -o "$st/bin/rwx" ./backends/qemu/guest/rwx)
	chmod 755 "$st/init" "$st/bin/busybox"
	# /dev/console lets the kernel give /init a console before devtmpfs is
	# mounted; /init redirects to it again after mounting, so the node is
	# optional (it needs root).
	mknod "$st/dev/console" c 5 1 2>/dev/null || true
	(cd "$st" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$out/initrd.gz.tmp"
	mv "$out/initrd.gz.tmp" "$out/initrd.gz"
	rm -rf "$st"
fi

make -s -C "$root/backends/qemu/plugin" OUT="$out"
log "ready: $(cat "$out/kernel.version" 2>/dev/null || echo kernel), $out/initrd.gz, $out/ptstore.so"
