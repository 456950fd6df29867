"""An exclusive lock on a spot store, so that two runs never write into one store at once.

The lock is a small JSON file, ``.dflashdeconv.lock``, beside the store's metadata (zarr
and anndata ignore it), created atomically with ``O_CREAT | O_EXCL`` on local disks. A
lock left by a process that no longer runs on this host is stale and taken over. On
object stores (fsspec URLs) creation is write-then-verify: adequate against a second
run started by mistake, not a distributed mutex.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from ..errors import DFlashDeconvError
from .store import local_path

LOCK_NAME = ".dflashdeconv.lock"


class StoreLockedError(DFlashDeconvError):
    """Another run holds the store's lock."""


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell for another host (or an unreadable lock): assume it runs
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Context manager holding the lock of the store at ``path`` for ``purpose``."""

    def __init__(self, path, purpose: str):
        self.path = str(path).rstrip("/")
        self.purpose = purpose
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._held = False

    def _busy(self, owner: dict):
        return StoreLockedError(
            f"{self.path} is in use by another run ({owner.get('purpose')}, pid "
            f"{owner.get('pid')} on {owner.get('host')} since {owner.get('since')}); wait for "
            f"it to finish, or remove {self.path}/{LOCK_NAME} if that run is gone")

    def acquire(self) -> "StoreLock":
        local = local_path(self.path)
        payload = json.dumps(self.owner).encode()
        if local is not None:
            file = local / LOCK_NAME
            # written aside, then linked into place: the lock never exists without its owner
            # (a lock seen empty would look stale and be taken over)
            draft = local / f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex}"
            draft.write_bytes(payload)
            try:
                for _ in range(2):
                    try:
                        os.link(draft, file)
                    except FileExistsError:
                        try:
                            owner = json.loads(file.read_text())
                        except FileNotFoundError:
                            continue  # released meanwhile
                        except (OSError, ValueError):
                            owner = {"pid": "unreadable"}
                        if _alive(owner):
                            raise self._busy(owner) from None
                        file.unlink(missing_ok=True)  # stale: its process is gone
                        continue
                    self._held = True
                    return self
            finally:
                draft.unlink(missing_ok=True)
            raise self._busy({})
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.path)
        target = f"{root}/{LOCK_NAME}"
        if fs.exists(target):
            raise self._busy(json.loads(fs.cat_file(target) or b"{}"))
        fs.pipe_file(target, payload)
        if fs.cat_file(target) != payload:
            raise self._busy(json.loads(fs.cat_file(target) or b"{}"))
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        local = local_path(self.path)
        if local is not None:
            (local / LOCK_NAME).unlink(missing_ok=True)
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.path)
            fs.rm_file(f"{root}/{LOCK_NAME}")
        self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
