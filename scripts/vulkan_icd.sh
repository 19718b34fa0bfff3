#!/usr/bin/env bash
# Prints the Vulkan driver (ICD file) the Makefile points SAPIEN at through VK_ICD_FILENAMES:
# nothing where an NVIDIA GPU works (the Vulkan loader then finds NVIDIA's driver by itself, and
# the ManiSkill envs render on the GPU), else Mesa's lavapipe (software Vulkan). Printed even
# before lavapipe is installed: make reads this before `make setup` installs it. A user's own
# VK_ICD_FILENAMES is kept by the Makefile, not decided here.
set -u
LAVAPIPE_ICD=/usr/share/vulkan/icd.d/lvp_icd.json

# `nvidia-smi -L` lists "GPU 0: ..." per GPU; it fails (or lists none) with a broken driver,
# where NVIDIA's Vulkan driver would not work either.
nvidia_gpu_works() {
  local gpus
  command -v nvidia-smi >/dev/null 2>&1 && gpus=$(timeout 20 nvidia-smi -L 2>/dev/null) && [[ $gpus == *"GPU "* ]]
}

if ! nvidia_gpu_works; then
  echo "$LAVAPIPE_ICD"
fi
