import errno
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lcpn import fsio
from lcpn.errors import LcpnError


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_importing_fsio_leaves_the_umask_alone():
    """os.umask() can only be read by setting it, which other threads would see for a moment."""
    code = "import os\ndef refuse(mask): raise SystemExit('umask changed')\nos.umask = refuse\nimport lcpn.fsio\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr


def test_written_files_follow_the_umask_in_force_when_written(tmp_path, umask_027):
    fsio.write_text(tmp_path / "a.txt", "x")
    assert mode(tmp_path / "a.txt") == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    fsio.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), fsio.atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def _old_folder(tmp_path: Path) -> Path:
    old = tmp_path / "out"
    (old / "embeddings").mkdir(parents=True)
    (old / "embeddings" / "cache.npy").write_text("cached")
    (old / "old.csv").write_text("old")
    return old


def test_replaced_folder_swaps_in_whole_and_keeps_what_it_is_told(tmp_path, umask_027):
    out = _old_folder(tmp_path)
    with fsio.replaced_folder(out, keep=("embeddings", "missing")) as new:
        (new / "new.csv").write_text("new")
        assert (out / "old.csv").is_file()  # the old folder stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "new.csv"]
    assert (out / "embeddings" / "cache.npy").read_text() == "cached"
    assert mode(out) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replaced_folder_keeps_the_old_folder_when_the_block_fails(tmp_path):
    out = _old_folder(tmp_path)
    with pytest.raises(RuntimeError), fsio.replaced_folder(out, keep=("embeddings",)) as new:
        (new / "new.csv").write_text("new")
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "old.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".out.0123456789abcdef.tmp").mkdir()
    (tmp_path / ".out.0123456789abcdef.tmp" / "half.csv").write_text("half")
    (tmp_path / ".out.fedcba9876543210.tmp").write_text("half")
    (tmp_path / ".output.0123456789abcdef.tmp").write_text("another folder's")
    with fsio.replaced_folder(tmp_path / "out") as new:
        (new / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".output.0123456789abcdef.tmp", "out"]


def test_a_full_disk_is_one_sentence_naming_the_folder(tmp_path):
    expected = re.escape(f"no space left on the disk that holds '{tmp_path}'")
    with pytest.raises(fsio.DiskFullError, match=expected), fsio.disk_full_as_error(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert issubclass(fsio.DiskFullError, LcpnError)
    with pytest.raises(PermissionError), fsio.disk_full_as_error(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_csv_round_trip(tmp_path):
    fsio.write_csv(tmp_path / "x.csv", ("path", "label"), [("a b.jpg", "x,y"), ("ü.jpg", 'say "hi"')])
    assert fsio.read_csv(tmp_path / "x.csv") == [
        {"path": "a b.jpg", "label": "x,y"},
        {"path": "ü.jpg", "label": 'say "hi"'},
    ]
