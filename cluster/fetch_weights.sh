#!/usr/bin/env bash
# Downloads the weights the studies need into their default paths on this node, once (to a temporary name
# first, so a broken download is retried at the next `ray up`). Run by setup_commands on every node.
set -euo pipefail

fetch() {  # fetch URL FILE
  test -f "$2" && return
  mkdir -p "$(dirname "$2")"
  curl -fsSL -o "$2.part" "$1"
  mv "$2.part" "$2"
}

# Inception-v3 for FID: NVIDIA's TorchScript file, the network behind EDM's reference statistics.
fetch https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt \
  ~/.cache/torch/hub/checkpoints/inception-2015-12-05.pt
# The model of studies/cifar10.py at its default path (trials load it where the driver found it). Add the
# checkpoints of other studies the same way.
fetch https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl \
  ~/checkpoints/edm-cifar10-32x32-uncond-vp.pkl
