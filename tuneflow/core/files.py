"""Files and folders that appear whole or not at all: written under a staging name beside their final name (the
same file system), then renamed into place in one step. A process killed midway leaves a hidden `.partial` staging
entry, never a half-written final one.

    with staged(path) as tmp:          # one writer: an existing `path` is replaced
        tmp.write_text(...)            # or: model.save_pretrained(tmp)
    with staged(entry, keep_existing=True) as tmp:   # several writers of the same content: the first one wins
        build(tmp)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

STAGING_SUFFIX = ".partial"


def cache_root() -> Path:
    """This machine's cache of artifacts, models and prepared datasets: $TUNEFLOW_CACHE, else ~/.cache/tuneflow."""
    root = Path(os.environ.get("TUNEFLOW_CACHE") or Path.home() / ".cache" / "tuneflow").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def staging_path(final: Path, unique: bool = False) -> Path:
    """Where ``final`` is written before it is renamed into place: `.<name>.partial` beside it, or with ``unique``
    `.<name>.<random>.partial`, a name of this writer's own when several may write the same entry at once."""
    tag = f".{uuid.uuid4().hex[:8]}" if unique else ""
    return final.with_name(f".{final.name}{tag}{STAGING_SUFFIX}")


def is_staging(path: Path) -> bool:
    """A staging entry of `staging_path` (left behind where its writer was killed)."""
    return path.name.startswith(".") and path.name.endswith(STAGING_SUFFIX)


def remove(path: Path) -> None:
    """Remove a file, a symlink or a folder, if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def install(staging: Path, final: Path, keep_existing: bool = False) -> bool:
    """Rename the complete ``staging`` file or folder to ``final`` in one step; True if it became ``final``.

    An existing ``final`` is replaced, or with ``keep_existing`` (folders written by several processes with the same
    content) kept: another writer got there first, and ``staging`` is removed."""
    if keep_existing:
        try:
            os.rename(staging, final)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            remove(staging)
            return False
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(staging, final)
    return True


@contextlib.contextmanager
def staged(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """The staging path of ``final``, installed when the block ends without an error and removed when it raises.
    A single writer's staging entry left by a killed attempt is cleared first."""
    staging = staging_path(final, unique=keep_existing)
    remove(staging)
    try:
        yield staging
        install(staging, final, keep_existing)
    finally:
        remove(staging)
