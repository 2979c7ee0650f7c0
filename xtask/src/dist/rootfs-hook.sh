#!/bin/sh
# mmdebstrap --customize-hook for the dist test's guest: $1 is the new root file system.
# Booted with systemd as PID 1; qtrace-dist-test.service runs /dist/test.sh from the second
# disk, prints on the serial console and powers off.
set -e
R=$1
cat > "$R/etc/systemd/system/qtrace-dist-test.service" <<'UNIT'
[Unit]
Description=qtrace dist test (/dist/test.sh from the second disk)
After=basic.target prometheus.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /dist && mount -o ro /dev/vdb /dist && cd /dist && /bin/bash /dist/test.sh; systemctl --no-block poweroff'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf ../qtrace-dist-test.service "$R/etc/systemd/system/multi-user.target.wants/"
# Nothing else on the console or the CPU: no getty, no timers.
for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
    apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
    systemd-timesyncd.service podman-auto-update.timer podman-clean-transient.timer; do
    ln -sf /dev/null "$R/etc/systemd/system/$u"
done
# Podman without overlayfs or D-Bus: vfs storage, cgroupfs, events in a file.
mkdir -p "$R/etc/containers"
printf '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
    > "$R/etc/containers/storage.conf"
printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' > "$R/etc/containers/containers.conf"
echo qtrace-guest > "$R/etc/hostname"
