#!/bin/sh
# Boot: modules, network from the kernel command line, the data disk, the services.
exec >/dev/console 2>&1

for module in $(cat /etc/modules.order); do
    insmod "/lib/modules/$module.ko" || echo "ferry: cannot load module $module"
done

for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ferry.ip=*) ADDRESS="${arg#ferry.ip=}" ;;
        ferry.gw=*) GATEWAY="${arg#ferry.gw=}" ;;
        ferry.hostname=*) NAME="${arg#ferry.hostname=}" ;;
    esac
done
hostname "${NAME:-appliance}"
ip link set lo up
if [ -n "$ADDRESS" ]; then
    for _ in $(seq 1 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.05; done
    ip link set eth0 up
    ip addr add "$ADDRESS" dev eth0
    [ -n "$GATEWAY" ] && ip route add default via "$GATEWAY"
    # Tell the switch where this address lives now (matters after a move).
    arping -U -c 1 -I eth0 "${ADDRESS%/*}" >/dev/null 2>&1 &
fi

# The data disk is the virtio disk whose serial is "data".
DATA=""
for _ in $(seq 1 100); do
    for disk in /sys/block/vd*; do
        [ "$(cat "$disk/serial" 2>/dev/null)" = data ] && DATA="/dev/${disk##*/}"
    done
    [ -n "$DATA" ] && [ -b "$DATA" ] && break
    sleep 0.05
done
if [ -n "$DATA" ]; then
    if [ "$(dd if="$DATA" bs=65536 count=1 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
        echo "ferry: formatting blank data disk $DATA as ext4"
        /usr/lib/ferry/mke2fs -q -F -t ext4 -L data -E lazy_itable_init=1,lazy_journal_init=1 "$DATA"
    fi
    if mount -t ext4 -o noatime "$DATA" /data; then
        /sbin/ferry-guest-ctl start
    else
        echo "ferry: data disk $DATA is not blank and not ext4; not mounted"
    fi
else
    echo "ferry: no data disk; ferry-guest keeps its data in /run"
    mkdir -p /run/data && mount --bind /run/data /data && /sbin/ferry-guest-ctl start
fi

acpid -c /etc/acpi
