#!/usr/bin/env bash
# Make sure SAPIEN 3 (ManiSkill's renderer) finds a Vulkan driver it can use.
# With no GPU, that is Mesa's lavapipe (software Vulkan); SAPIEN needs Mesa >= 25, which on
# Debian 12 comes from bookworm-backports (Debian's default Mesa 22 fails with
# "Failed to find a supported physical device"). Idempotent: does nothing when it is there.
set -euo pipefail
LAVAPIPE_ICD=/usr/share/vulkan/icd.d/lvp_icd.json

mesa_version() { dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true; }
mesa_is_new_enough() {
  local v; v=$(mesa_version)
  [ -n "$v" ] && dpkg --compare-versions "$v" ge 25 && [ -f "$LAVAPIPE_ICD" ]
}

# The driver to use: the Makefile's VK_ICD_FILENAMES (yours, or scripts/vulkan_icd.sh's choice:
# lavapipe, or none where an NVIDIA GPU works); run on its own, the same choice.
icd=${VK_ICD_FILENAMES-$(bash "$(dirname "$0")/vulkan_icd.sh")}
if [ -z "$icd" ]; then
  echo "setup: NVIDIA GPU found; SAPIEN renders on it through NVIDIA's Vulkan driver"
  if ! compgen -G '/usr/share/vulkan/icd.d/nvidia*.json' >/dev/null \
     && ! compgen -G '/etc/vulkan/icd.d/nvidia*.json' >/dev/null; then
    echo "setup: warning: no NVIDIA Vulkan ICD file in /usr/share/vulkan/icd.d or /etc/vulkan/icd.d" >&2
    echo "       (in a container, NVIDIA_DRIVER_CAPABILITIES must include graphics)" >&2
  fi
  exit 0
fi
if [ "$icd" != "$LAVAPIPE_ICD" ]; then
  echo "setup: VK_ICD_FILENAMES=$icd (yours): nothing to install"; exit 0
fi
if mesa_is_new_enough; then
  echo "setup: software Vulkan ok (mesa-vulkan-drivers $(mesa_version))"; exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "setup: SAPIEN needs a Vulkan driver: a GPU driver, or Mesa >= 25's lavapipe" >&2
  echo "       (Debian 12: as root, apt-get install -t bookworm-backports mesa-vulkan-drivers)" >&2
  exit 1
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "setup: adding bookworm-backports for Mesa >= 25"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    > /etc/apt/sources.list.d/bookworm-backports.sources
fi
apt-get update -q
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports mesa-vulkan-drivers libvulkan1
else
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers libvulkan1
fi
mesa_is_new_enough || { echo "setup: installed Mesa $(mesa_version) is older than 25" >&2; exit 1; }
echo "setup: software Vulkan ok (mesa-vulkan-drivers $(mesa_version))"
