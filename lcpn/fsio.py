"""Atomic writes: a reader sees the old file or folder or the new one, never half of one.

Temporaries are hidden siblings named ``.<name>.<random>.tmp``; a run that was killed leaves them
behind, and the next ``replaced_folder`` of the same path (or ``remove_temporaries``) removes them.
New files and folders are created with ``os.open``/``mkdir`` modes, so the kernel applies the umask in
force; reading the umask would mean setting it, which other threads would see for a moment.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .errors import LcpnError

_TMP_SUFFIX = ".tmp"


class DiskFullError(LcpnError):
    """No space was left where lcpn writes; the message names the folder."""


@contextlib.contextmanager
def disk_full_as_error(
    folder: str | Path, advice: str = "free some space there or choose another folder"
) -> Iterator[None]:
    """Turn "no space left" (or "quota exceeded") inside the block into a DiskFullError naming ``folder``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"no space left on the disk that holds '{folder}'; {advice}") from None


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{_TMP_SUFFIX}")


def remove_temporaries(path: str | Path) -> None:
    """Remove the temporaries that killed runs left beside ``path``.

    Two runs writing the same path at once are not supported: one would remove the other's.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    ours = re.compile(re.escape(f".{path.name}.") + "[0-9a-f]{16}" + re.escape(_TMP_SUFFIX))
    for entry in path.parent.iterdir():
        if ours.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def replaced_folder(path: str | Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` that takes the place of ``path`` whole if the block succeeds.

    The old folder stays untouched until then; its entries named in ``keep`` (a cache worth keeping)
    move over to the new one just before the swap. If the block fails, or the process is killed,
    ``path`` is the old folder, or absent for a moment between the two renames of the swap.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path)
    tmp = _temporary_name(path)
    tmp.mkdir(0o777)
    try:
        yield tmp
        if path.exists():
            for name in keep:
                if (path / name).exists() and not (tmp / name).exists():
                    os.replace(path / name, tmp / name)
            old = _temporary_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (images and weights files alike)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
