"""Writing files so that a crash or a full disk never leaves a half-written one, and checking that an
output location is writable before any work starts.

This module sits at the bottom of the layers (it imports nothing from the project), so the data
generators, model checkpoints, the feature store and the pipelines all share one implementation.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class OutputError(OSError):
    """An output path that cannot be written; the message names the path and the fix."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, exclusive: bool = False, durable: bool = True) -> bool:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync and rename.

    With ``exclusive`` the file is created only if absent (a hard link, atomic), returning False when
    another process created it first; ranks of a distributed run can race to create one manifest.
    Files are 0644: ``mkstemp`` makes 0600 files, and outputs are meant to be shared."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: create-if-absent, then rename
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return True


def atomic_write_text(path: str | Path, text: str, **kwargs: Any) -> bool:
    return atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> bool:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", **kwargs)


def atomic_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary directory beside ``final`` with ``write(tmp)``, then rename it into place, so a
    crash leaves either the old directory or the new one, never half of one."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (torch.save, savefig,
    safetensors); renamed into place when the block ends without an error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output location that cannot be written, before any work is done.

    ``path`` may not exist yet: its nearest existing ancestor must be a writable directory. The probe
    creates and removes a file, because permission bits lie for root and on read-only mounts."""
    path = Path(path)
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if path.exists() and not path.is_dir() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file is not writable; choose another path or fix its permissions")
    if not probe_dir.is_dir():
        raise OutputError(f"{what} {path}: {probe_dir} is not a directory; choose another output path")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".fvl-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{what} {path}: cannot write in {probe_dir} ({reason}); choose a writable "
                          "directory or fix its permissions") from exc
    return path


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do about it."""
    where = exc.filename or ""
    reason = exc.strerror or str(exc)
    fixes = {
        "ENOSPC": "free some disk space, then rerun the same command (finished work is kept)",
        "EROFS": "the file system is read-only; choose a writable output directory",
        "EACCES": "permission denied; choose a writable location or fix the permissions",
        "EPERM": "operation not permitted; choose a writable location or fix the permissions",
        "ENOENT": "no such file or directory; check the path",
        "EDQUOT": "disk quota exceeded; free some space, then rerun",
    }
    code = errno.errorcode.get(exc.errno or 0, "")
    fix = fixes.get(code, "check the path and rerun")
    return f"{where}: {reason}; {fix}" if where else f"{reason}; {fix}"
