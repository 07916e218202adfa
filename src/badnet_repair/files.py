"""Atomic file writes: an interrupted run never leaves a half-written file that looks complete."""

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from badnet_repair import UserError


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def writable_dir(path: str | Path, key: str) -> Path:
    """Create `path` if needed and prove it writable now, not after an hour of work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{key}={path}: cannot write there ({e.strerror or e})") from None
    return path


_hashes: dict[tuple, str] = {}


def content_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes; recomputed only when its size or modification time changes."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]
