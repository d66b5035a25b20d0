"""The private runtime directory (0700) holding each mesh's socket and key file."""

from __future__ import annotations

import itertools
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

from .._errors import MeshError

__all__ = ["key_path", "new_mesh_name", "runtime_dir", "socket_path"]

ENV_RUNTIME_DIR: Final = "MPMESH_RUNTIME_DIR"
_names = itertools.count()


def runtime_dir() -> Path:
    """Return (creating it if needed) a directory only this user can enter.

    ``$MPMESH_RUNTIME_DIR`` wins, then ``$XDG_RUNTIME_DIR/mpmesh``, then
    ``<tmp>/mpmesh-<uid>``. An existing directory that someone else owns, or that
    others can enter, is refused rather than used.
    """
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        path = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR") and os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "mpmesh"
    else:
        path = Path(tempfile.gettempdir()) / f"mpmesh-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise MeshError(
            f"runtime directory {path} must be a directory owned by uid {os.getuid()} "
            f"with mode 0700 (found mode {stat.filemode(info.st_mode)}, uid {info.st_uid})"
        )
    return path


def socket_path(name: str) -> str:
    return str(runtime_dir() / f"{name}.sock")


def key_path(name: str) -> str:
    return str(runtime_dir() / f"{name}.key")


def new_mesh_name() -> str:
    """A name unique on this machine for an anonymous mesh."""
    return f"m{os.getpid()}-{next(_names)}-{os.urandom(3).hex()}"
