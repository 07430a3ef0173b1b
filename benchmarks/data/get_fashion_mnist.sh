#!/usr/bin/env bash
# Fashion-MNIST (60k train / 10k test, 10 classes) from the Debian package dataset-fashion-mnist, offline afterwards.
# Downloads the .deb with apt-get, unpacks it with dpkg -x (no install) and copies the four
# {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz files into DEST, the `root` of datamodules.IDXDataModule.
# Usage (from the repository root): benchmarks/data/get_fashion_mnist.sh [DEST]   (default: data/fashion_mnist)
set -euo pipefail
dest=$(realpath -m "${1:-data/fashion_mnist}")
mkdir -p "$dest/.download"
cd "$dest/.download"
if ! ls dataset-fashion-mnist_*.deb >/dev/null 2>&1; then
    apt-get download dataset-fashion-mnist
fi
dpkg -x dataset-fashion-mnist_*.deb "$dest/.download/pkg"
images=$(find "$dest/.download/pkg" -name 'train-images-idx3-ubyte.gz' -print -quit)
if [ -z "$images" ]; then
    echo "train-images-idx3-ubyte.gz not found in the package (contents: dpkg -c $dest/.download/*.deb)" >&2
    exit 1
fi
cp "$(dirname "$images")"/*-ubyte.gz "$dest/"
ls -l "$dest"
echo "Fashion-MNIST IDX files: $dest"
