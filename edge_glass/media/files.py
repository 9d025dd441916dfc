"""Reading an input file's bytes with errors that name it; ``FileSlice`` names a byte range of a
file (a member of a webdataset tar shard) that is read on demand, wherever a path is taken."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class FileSlice:
    """``size`` bytes of ``path`` from byte ``offset``: a lazy, picklable, hashable reference to one
    member of a tar shard (``name``), read by a seek when its bytes are needed."""

    path: str
    offset: int
    size: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.name}" if self.name else f"{self.path}@{self.offset}+{self.size}"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"truncated: {len(data)} of {self.size} bytes")
        return data


def read_bytes(path: str | os.PathLike | FileSlice, kind: str) -> bytes:
    """The file's bytes; a missing or unreadable file raises InputError ("<kind> file not found")."""
    try:
        return path.read() if isinstance(path, FileSlice) else Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(str(path), f"{kind} file not found") from None
    except IsADirectoryError:
        raise InputError(str(path), f"{kind} path is a directory") from None
    except EOFError as exc:
        raise InputError(str(path), f"{kind} {exc}") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read {kind} file ({exc.strerror or exc})") from None
