#!/usr/bin/env bash
# Builds the Debian 12 test guest: a GPT disk with a BIOS boot partition, an EFI system
# partition and an ext4 root made by debootstrap from Debian's packages — systemd, the
# distribution's qemu-guest-agent and cloud-init (NoCloud), the cloud kernel — and GRUB
# installed for both BIOS (i386-pc) and UEFI (x86_64-efi, at the removable path, so
# OVMF finds it without NVRAM entries). The machine id is left empty, so every VM made
# from the image gets its own. Run by `ferry image build-debian` as root; needs loop
# devices (with partitions), debootstrap, sfdisk, mkfs.vfat, mkfs.ext4 and qemu-img.
#
# In: MIRROR (a Debian mirror URL, from the system's own sources), OUT (the qcow2 to
# write), WORK (a scratch directory, removed first), SIZE (of the disk, default 3G).
set -euo pipefail
: "${MIRROR:?}" "${OUT:?}" "${WORK:?}"
SIZE="${SIZE:-3G}"
# debootstrap lays the base; apt inside it installs the rest (debootstrap's own resolver
# does not follow virtual packages, which cloud-init's Python dependencies use).
BASE=systemd,systemd-sysv,udev,dbus,kmod
PACKAGES="iproute2 ifupdown isc-dhcp-client sudo openssh-server qemu-guest-agent cloud-init
linux-image-cloud-amd64 initramfs-tools grub-pc-bin grub-efi-amd64-bin grub2-common"

image="$WORK/disk.raw"
root="$WORK/root"
loop=""
made_link=""

cleanup() (
    set +e
    [ -n "$made_link" ] && rm -f "$made_link"
    for mount in "$root/boot/efi" "$root/dev/pts" "$root/dev" "$root/proc" "$root/sys" "$root"; do
        mountpoint -q "$mount" && umount "$mount"
    done
    if [ -n "$loop" ]; then
        partx -d "$loop" 2>/dev/null
        losetup -d "$loop"
    fi
)
trap cleanup EXIT

step() { echo "build-debian: $*"; }

# A build that was killed may have left its mounts (the host's /dev among them): they
# go first, and the scratch directory is removed without crossing into any mount.
remove_work() {
    if [ -d "$WORK" ]; then
        { findmnt -rn -o TARGET | grep -F "$WORK/" || true; } | sort -r | while read -r mount; do
            umount "$mount" || umount -l "$mount"
        done
        if findmnt -rn -o TARGET | grep -qF "$WORK/"; then
            echo "build-debian: mounts under $WORK remain; not removing it" >&2
            exit 1
        fi
        rm -rf --one-file-system "$WORK"
    fi
}
remove_work
mkdir -p "$WORK" "$root"
truncate -s "$SIZE" "$image"
sfdisk -q "$image" <<PARTITIONS
label: gpt
,1M,21686148-6449-6E6F-744E-656564454649
,64M,C12A7328-F81F-11D2-BA4B-00A0C93EC93B
,,0FC63DAF-8483-4772-8E79-3D69D8477DE4
PARTITIONS

loop="$(losetup --partscan --find --show "$image")"
partx -u "$loop" 2>/dev/null || partx -a "$loop"
# Without udev the partitions' nodes may be missing: make them from sysfs.
for part in 1 2 3; do
    node="${loop}p$part"
    for _ in $(seq 50); do [ -b "$node" ] && break; sleep 0.1; done
    if [ ! -b "$node" ]; then
        numbers="$(cat "/sys/block/${loop#/dev/}/${loop#/dev/}p$part/dev")"
        mknod "$node" b "${numbers%:*}" "${numbers#*:}"
    fi
done

mkfs.vfat -F 32 -n EFI "${loop}p2" >/dev/null
mkfs.ext4 -q -L root "${loop}p3"
mount "${loop}p3" "$root"

step "debootstrap bookworm from $MIRROR"
if ! debootstrap --variant=minbase --include="$BASE" bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    cp "$root/debootstrap/debootstrap.log" "$WORK/debootstrap-inner.log" 2>/dev/null
    grep -iE "error|fail" "$WORK/debootstrap-inner.log" 2>/dev/null | tail -n 5 >&2
    tail -n 3 "$WORK/debootstrap.log" >&2
    exit 1
fi

mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"

step "packages"
# shellcheck disable=SC2086
if ! chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends $PACKAGES >"$WORK/apt.log" 2>&1; then
    tail -n 10 "$WORK/apt.log" >&2
    exit 1
fi

root_uuid="$(blkid -s UUID -o value "${loop}p3")"
efi_uuid="$(blkid -s UUID -o value "${loop}p2")"
cat >"$root/etc/fstab" <<FSTAB
UUID=$root_uuid / ext4 errors=remount-ro 0 1
UUID=$efi_uuid /boot/efi vfat umask=0077,nofail 0 2
FSTAB
echo debian >"$root/etc/hostname"
cat >"$root/etc/network/interfaces" <<'INTERFACES'
auto lo
iface lo inet loopback
source /etc/network/interfaces.d/*
INTERFACES
mkdir -p "$root/etc/cloud/cloud.cfg.d"
cat >"$root/etc/cloud/cloud.cfg.d/90-ferry.cfg" <<'CLOUD'
# Ferry personalises its guests with a NoCloud seed (a cidata CD-ROM).
datasource_list: [ NoCloud, None ]
# RSA host keys cost 15 s of a boot under TCG; ed25519 and ECDSA take milliseconds and
# every current SSH client speaks them.
ssh_genkeytypes: [ ed25519, ecdsa ]
CLOUD
# e2scrub_reap removes stale e2scrub LVM snapshots (the image has no LVM) and holds the
# boot for 10 s under TCG.
ln -sf /dev/null "$root/etc/systemd/system/e2scrub_reap.service"
cat >>"$root/etc/default/grub" <<'GRUB'
GRUB_TIMEOUT=1
GRUB_CMDLINE_LINUX_DEFAULT="console=tty0 console=ttyS0,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB

step "GRUB for BIOS and UEFI"
mkdir -p "$root/boot/efi"
chroot "$root" grub-install --target=i386-pc "$loop" >"$WORK/grub.log" 2>&1 ||
    { cat "$WORK/grub.log" >&2; exit 1; }
# This kernel may have no vfat, so the EFI system partition is never mounted here: the
# UEFI loader is made with grub-mkimage (finding the root by its UUID) and copied in
# with mtools, at the removable-media path OVMF boots without NVRAM entries.
mkdir -p "$root/boot/grub/x86_64-efi"
cp "$root"/usr/lib/grub/x86_64-efi/*.mod "$root"/usr/lib/grub/x86_64-efi/*.lst "$root/boot/grub/x86_64-efi/"
cat >"$root/tmp/early.cfg" <<EARLY
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
configfile \$prefix/grub.cfg
EARLY
chroot "$root" grub-mkimage -O x86_64-efi -o /tmp/BOOTX64.EFI -c /tmp/early.cfg -p /boot/grub \
    part_gpt part_msdos ext2 fat search search_fs_uuid normal configfile linux echo \
    efi_gop efi_uga all_video gzio test
export MTOOLS_SKIP_CHECK=1
{ mmd -i "${loop}p2" ::/EFI ::/EFI/BOOT && mcopy -i "${loop}p2" "$root/tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI; } \
    2>"$WORK/mtools.log" || { cat "$WORK/mtools.log" >&2; exit 1; }
rm -f "$root/tmp/early.cfg" "$root/tmp/BOOTX64.EFI"
# grub-mkconfig names the root by UUID only if udev's link for it exists; without udev
# here, make that one link (in the host's /dev, bound into the chroot) for the moment.
by_uuid="/dev/disk/by-uuid/$root_uuid"
mkdir -p /dev/disk/by-uuid
ln -sf "${loop}p3" "$by_uuid"
made_link="$by_uuid"
chroot "$root" grub-mkconfig -o /boot/grub/grub.cfg >"$WORK/grub.log" 2>&1 ||
    { cat "$WORK/grub.log" >&2; exit 1; }
rm -f "$by_uuid"
made_link=""
grep -q "root=UUID=$root_uuid" "$root/boot/grub/grub.cfg" ||
    { echo "build-debian: grub.cfg does not name the root by UUID" >&2; exit 1; }

# Each VM made from the image gets its own identity.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
chroot "$root" passwd -l root >/dev/null
chroot "$root" apt-get clean
# The guest has no network to a mirror; it keeps no source of ours either.
echo "# Add your Debian mirror here." >"$root/etc/apt/sources.list"
rm -rf "$root"/var/lib/apt/lists/* "$root/var/log/"*.log

trap - EXIT
cleanup
loop=""
step "qcow2"
qemu-img convert -c -f raw -O qcow2 "$image" "$OUT.part"
mv "$OUT.part" "$OUT"
remove_work
