"""Fingerprints of what a file or folder holds, so that a result cached for some data, weights or checkpoint is
never reused after the contents changed under the same path: ablate's settings hash (the files and folders a
config names) and the cached helper models' keys (`zoo.engine.auxiliary.cache_key`: the files and folders a
datamodule's settings name). Pure functions of the files, so every process of a distributed run that reads the
same files gets the same fingerprint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASHED_FILE_LIMIT = 64 * 2**20  # files up to this size are hashed; larger ones: size + mtime
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> digest, once per process


def folder_fingerprint(path: str) -> str:
    """The contents of a folder (a data root): the count of its files and a sha256 of each one's path relative to
    the folder, size and modification time (`os.walk`, links followed, in sorted order), so a file added, removed,
    renamed or rewritten there changes it, and it costs a `stat` per file, not a read (a data set of a million
    images: seconds). Hidden files and folders (a part of the path below the folder starts with ".": .DS_Store,
    editor and lock files, .ipynb_checkpoints) are left out, as the image readers leave them out
    (`datamodules.image_folder.visible`). A file rewritten with the same size within the file system's mtime
    resolution is not seen."""
    digest, count = hashlib.sha256(), 0
    for root, folders, files in os.walk(path, followlinks=True):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            try:
                stat = os.stat(full)
            except OSError:  # a broken link: no contents to read
                continue
            digest.update(f"{os.path.relpath(full, path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
    return f"folder of {count} files, sha256 {digest.hexdigest()}"


def file_fingerprint(path: str) -> str:
    """The contents of a file: its sha256 up to HASHED_FILE_LIMIT bytes (exact: a refitted checkpoint or a
    rewritten CSV changes it, a copy or a `touch` does not), else its size and modification time (hashing gigabytes
    of pretrained weights at every point of every rerun would cost minutes; a refit rewrites the file, which changes
    its mtime). Hashes are kept per process, keyed by the file's size and mtime."""
    stat = os.stat(path)
    if stat.st_size > HASHED_FILE_LIMIT:
        return f"size {stat.st_size}, mtime_ns {stat.st_mtime_ns}"
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_DIGESTS[key] = f"sha256 {digest.hexdigest()}"
    return _FILE_DIGESTS[key]


def holds_working_folder(path: str | Path) -> bool:
    """Whether folder `path` is the working folder or a folder above it."""
    folder, here = Path(path).resolve(), Path.cwd().resolve()
    return folder == here or folder in here.parents


def written_by_runs(path: str, outputs: Path | None = None) -> bool:
    """Whether folder `path` is one a run writes in, whose contents change with every run (a fingerprint of it would
    make every cached result stale at once): the working folder or a folder above it (every run writes below it), a
    folder holding `outputs` (the run folder) or lying inside it."""
    if holds_working_folder(path):
        return True
    folder = Path(path).resolve()
    written = outputs.resolve() if outputs is not None else None
    return written is not None and (folder == written or folder in written.parents or written in folder.parents)
