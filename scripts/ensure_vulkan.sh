#!/usr/bin/env bash
# Make sure SAPIEN finds a Vulkan device (it needs one even for state observations).
# A machine with a GPU driver already has one; otherwise install Mesa's CPU driver (lavapipe >= 24.3).
# On a CUDA machine ManiSkill's GPU simulation renders on the GPU itself, through NVIDIA's Vulkan driver: without
# it state training still runs (unrendered), and this says in one line what rendering needs.
# Usage: scripts/ensure_vulkan.sh PYTHON
set -u
PY=${1:-python3}
has_device() { "$PY" -c "import sapien; sapien.render.RenderSystem()" >/dev/null 2>&1; }
has_cuda() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
cuda_renders() { "$PY" -c "import sapien; sapien.render.RenderSystem(sapien.Device('cuda'))" >/dev/null 2>&1; }
check_cuda_rendering() {
  if has_cuda && ! cuda_renders; then
    echo "warning: SAPIEN finds no Vulkan device on this GPU: GPU-simulated state training runs unrendered (no eval" \
         "videos) and image observations (ppo_rgb*.py) need NVIDIA's Vulkan driver: install the libnvidia-gl package" \
         "of the installed driver (in a container also libxext6, and NVIDIA_DRIVER_CAPABILITIES must include graphics)" >&2
  fi
}

if has_device; then
  check_cuda_rendering
  exit 0
fi
NEED="SAPIEN found no usable Vulkan device: install an NVIDIA driver, or Mesa >= 24.3 lavapipe (Debian 12: 'apt-get install -t bookworm-backports mesa-vulkan-drivers'; Ubuntu 24.10+: 'apt-get install mesa-vulkan-drivers')"

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: $NEED" >&2
  exit 2
fi
echo "SAPIEN found no Vulkan device; installing Mesa's software Vulkan driver (lavapipe)..."
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
export DEBIAN_FRONTEND=noninteractive
if [ "$codename" = bookworm ]; then
  # bookworm's own Mesa (22.3) lacks VK_KHR_external_semaphore_fd, which SAPIEN requires
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
  apt-get update -qq && apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
  apt-get update -qq && apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
if has_device; then
  echo "Vulkan: $("$PY" -c "import sapien; print(sapien.render.get_device_summary().splitlines()[0])")"
  check_cuda_rendering
  exit 0
fi
echo "error: $NEED" >&2
exit 2
