"""Reading an input file's bytes with errors that name it."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def read_bytes(path: str | os.PathLike, kind: str) -> bytes:
    """The file's bytes; a missing or unreadable file raises InputError ("<kind> file not found")."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(str(path), f"{kind} file not found") from None
    except IsADirectoryError:
        raise InputError(str(path), f"{kind} path is a directory") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read {kind} file ({exc.strerror or exc})") from None
