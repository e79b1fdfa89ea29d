"""Files: their SHA-256s (the identities that key caches and checkpoints), and files that several processes share:
sweep workers on one machine, or on many machines with one `outputs=`.

Every shared asset (latent and caption caches, real feature statistics, `result.json`, checkpoints) is written to a
temporary name of its own — host, process and a random suffix, so no two writers ever touch the same temporary file
— and renamed into place. A rename within a directory is atomic (POSIX, and NFS), so a reader sees the old file or
the new one, never half of one, and two writers of the same asset both succeed (the last rename wins; both wrote
the same content). Assets that are expensive to make (the VAE, the evaluator) are made once under `file_lock`, a
POSIX record lock (`fcntl.lockf`), which NFS forwards to the server, unlike BSD `flock` on some systems.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def temp_path(path: str | Path) -> Path:
    """A temporary sibling of `path` that no other writer (thread, process or host) uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


class DiskFullError(OSError):
    """The device ran out of space (or quota) while writing a file: one line naming it. What was there before (the
    previous checkpoint, a cache) is untouched; rerunning the command once space is back continues."""


def is_disk_full(e: BaseException, path: str | Path) -> bool:
    """ENOSPC/EDQUOT, also as torch.save reports it: a RuntimeError ("file write failed", "unexpected pos") with the
    errno lost, counted as a full disk when it says so or when `path`'s filesystem has under 1 MiB left."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(e, RuntimeError):
        return False
    if "write failed" in str(e) or "No space left" in str(e):
        return True
    try:
        return "unexpected pos" in str(e) and shutil.disk_usage(Path(path).parent).free < 2**20
    except OSError:
        return False


@contextmanager
def naming_full_disk(path: str | Path, what: str = "writing"):
    """Turn running out of disk space inside the block into a `DiskFullError` that names `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e, path):
            raise
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(f"no space left on the device {what} {path} ({free}); what was written before is kept: "
                            "free some space and rerun the command to continue") from e


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(binary file)` on a temporary file, fsync it, rename it to `path`; returns `path`. A full disk
    raises `DiskFullError` naming `path`; the file that was there stays whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with naming_full_disk(path), open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    return path


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save, atomically (see the module docstring)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


@contextmanager
def file_lock(path: str | Path):
    """An exclusive lock held while the block runs, across processes and (on NFS) machines; waits for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # lockf needs a file open for writing
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of a module's weights and buffers (names, dtypes, shapes, values), independent of any file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
