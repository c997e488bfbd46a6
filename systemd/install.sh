#!/usr/bin/env bash
# Install dicom-node as a systemd service on this machine (run as root, or with sudo):
#   sudo systemd/install.sh            # installs into /opt/dicom-node, starts dicom-node.service
# Safe to re-run (upgrades in place; an existing /etc/dicom-node/config.yaml is kept).
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${PREFIX:-/opt/dicom-node}
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo $0)" >&2; exit 1; }

# 1. the code and its virtual environment, owned by root and writable by root alone: the
#    service account (and whoever owns the checkout) can read and run it, never change it
if [ "$src" != "$prefix" ]; then
    mkdir -p "$prefix"
    tar -C "$src" --exclude=./.venv --exclude=./var --exclude=.git -cf - . |
        tar -C "$prefix" --no-same-owner --no-same-permissions -xf -
fi
DICOM_NODE_VENV="$prefix/.venv" "$prefix/quickstart" setup
chown -R root:root "$prefix"
chmod -R go-w,o+rX "$prefix"

# 2. the account, folders and unit
install -D -m 0644 "$src/systemd/dicom-node.sysusers.conf" /usr/lib/sysusers.d/dicom-node.conf
install -D -m 0644 "$src/systemd/dicom-node.tmpfiles.conf" /usr/lib/tmpfiles.d/dicom-node.conf
systemd-sysusers /usr/lib/sysusers.d/dicom-node.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/dicom-node.conf
sed "s#/opt/dicom-node#$prefix#g" "$src/systemd/dicom-node.service" > /etc/systemd/system/dicom-node.service
chmod 0644 /etc/systemd/system/dicom-node.service

# 3. the configuration (kept if present): the documented defaults, with the service's folders
if [ ! -e /etc/dicom-node/config.yaml ]; then
    sed -e "s#^  data_dir: ./var#  data_dir: /var/lib/dicom-node#" \
        -e "s#^  path: \(\./\)\{0,1\}models/#  path: $prefix/models/#" \
        "$src/config.yaml" > /etc/dicom-node/config.yaml
    chgrp dicom-node /etc/dicom-node/config.yaml
    chmod 0640 /etc/dicom-node/config.yaml
fi
"$prefix/.venv/bin/dicom-node" check-config /etc/dicom-node/config.yaml ||
    { echo "install.sh: /etc/dicom-node/config.yaml is refused (above); the service was not restarted" >&2; exit 1; }

# 4. start it, or restart it on the new code (an upgrade); a configuration the new code refuses
#    stopped the script above, before the restart
systemctl daemon-reload
systemctl enable dicom-node.service
systemctl restart dicom-node.service
systemctl --no-pager status dicom-node.service || true
