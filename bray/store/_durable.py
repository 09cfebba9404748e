"""Crash-safe file operations: fsync, atomic replace, flock, and sweeping what killed writers left."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
import logging
from typing import Iterator

logger = logging.getLogger("bray.store")


# A temp entry older than this is swept even if its owner looks alive (another host,
# or a reused pid): no healthy publish leaves its directory untouched this long.
_STALE_TMP_S = 60.0


def delete_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def tmp_name(kind: str) -> str:
    host = socket.gethostname().replace("/", "_") or "host"
    return f"{kind}-{host}-{os.getpid()}-{secrets.token_hex(6)}"


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a process on this host (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_tmp(tmp_root: Path) -> None:
    """Delete leftovers of killed publishes: dead local owner, or untouched for a minute."""
    host = socket.gethostname().replace("/", "_") or "host"
    now = time.time()
    try:
        entries = list(os.scandir(tmp_root))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            _sweep_entry(entry, host, now)
        except OSError as err:  # best effort: a later publish tries again
            logger.debug("could not sweep %s: %s", entry.path, err)


def _sweep_entry(entry: os.DirEntry[str], host: str, now: float) -> None:
    try:
        _kind, rest = entry.name.split("-", 1)
        owner_host, pid_text, _token = rest.rsplit("-", 2)
        dead = owner_host == host and not pid_alive(int(pid_text))
    except ValueError:
        dead = False
    if not dead:
        try:
            newest = entry.stat(follow_symlinks=False).st_mtime
            if entry.is_dir(follow_symlinks=False):
                for child in os.scandir(entry.path):
                    newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            return
        if now - newest < _STALE_TMP_S:
            return  # most likely a publish still in progress
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass


@contextmanager
def flock(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durable(path: Path, data: bytes, *, tmp_dir: Path) -> None:
    """Replace ``path`` with ``data`` atomically: write a temporary file, fsync, ``os.replace``.

    A reader sees the old content or the new, never a mix, even if the writer is killed.
    ``tmp_dir`` must be on the same file system (the store's ``.tmp/`` folders).
    """
    tmp = tmp_dir / tmp_name("replace")
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def discard(path: Path, tmp_root: Path) -> None:
    target = tmp_root / tmp_name("del")
    try:
        os.rename(path, target)
    except OSError:
        target = path
    shutil.rmtree(target, ignore_errors=True)
