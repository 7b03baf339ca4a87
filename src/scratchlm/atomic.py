"""Atomic writes: a file or a whole directory is written beside its target, then renamed into place.

A crash, a full disk or Ctrl-C at any moment leaves either the old artifact or the complete new one,
never half of one and never a mix of two. New files get the permissions the umask allows, like any
other tool's (`tempfile` would make them 0600).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from scratchlm.errors import ScratchLMError

TMP_SUFFIX = ".tmp"  # every temporary name made here: `.<target name>.<random>.tmp`


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkdirs(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ScratchLMError(f"{directory} exists and is not a directory") from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces `path` only when the block exits without error."""
    path = Path(path)
    _mkdirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(directory: str | os.PathLike) -> None:
    """Create `directory` if needed and make sure a file can be made in it, before any work starts."""
    directory = Path(directory)
    try:
        _mkdirs(directory)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=TMP_SUFFIX, dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ScratchLMError(f"cannot write to {directory}: {exc.strerror}") from None


def check_directory_target(path: str | os.PathLike, owned: Iterable[str]) -> None:
    """Check that `path` can become a directory written as a unit: absent, or a directory holding only
    entries named in `owned` (what the writer makes), with a writable parent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ScratchLMError(f"{path} exists and is not a directory: expected a directory to write into")
    if path.is_dir():
        owned = set(owned)
        foreign = sorted(p.name for p in path.iterdir() if p.name not in owned and not _is_temporary(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ScratchLMError(
                f"{path} holds files this command did not write ({shown}): give a new or empty directory"
            )
    check_writable(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, owned: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory that takes the place of `path` when the block succeeds.

    owned: the names the writer makes; an existing `path` holding anything else is refused (nothing
    is ever removed that this writer did not make). An existing `path` is swapped out in one atomic
    step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, the old directory kept aside until
    the new one is in place) and then removed. On any error the temporary directory is removed and
    `path` is untouched.
    """
    path = Path(path)
    check_directory_target(path, owned)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
            return
        if not _exchange(tmp, path):  # no atomic swap here: old aside, new in, old out
            aside = tmp.with_name(tmp.name + ".old")
            os.rename(path, aside)
            os.rename(tmp, path)
            tmp = aside
        shutil.rmtree(tmp)  # now the old directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2; False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_SUFFIX in name


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and directories that a killed process left in `directory` (only
    names this module makes: `.<name>.<random>.tmp`). Call it only while holding the directory's lock."""
    removed = []
    for stale in Path(directory).glob(f".*{TMP_SUFFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
