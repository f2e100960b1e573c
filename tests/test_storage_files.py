"""Durable files (storage.files): atomic writes, disk full, UID-safe paths."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import pytest

from storage.files import DiskFull, free_bytes, instance_path, result_path, safe_uid, write_atomic


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_bytes_creates_folders_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    assert write_atomic(target, b"DICM data") == target
    assert target.read_bytes() == b"DICM data"
    assert leftovers(target.parent) == []


def test_writer_callable_streams_into_the_file(tmp_path: Path) -> None:
    def writer(f: BinaryIO) -> None:
        for i in range(3):
            f.write(bytes([i]) * 10)

    target = write_atomic(tmp_path / "x.bin", writer)
    assert target.read_bytes() == b"\x00" * 10 + b"\x01" * 10 + b"\x02" * 10


def test_failing_writer_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    def writer(f: BinaryIO) -> None:
        f.write(b"half")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        write_atomic(tmp_path / "new.dcm", writer)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.dcm"
    old.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        write_atomic(old, writer)
    assert old.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_rename_failure_removes_the_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise PermissionError(errno.EACCES, "denied", dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_atomic(tmp_path / "x.dcm", b"data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_or_quota_raises_disk_full(tmp_path: Path, code: int) -> None:
    def writer(f: BinaryIO) -> None:
        raise OSError(code, os.strerror(code))

    with pytest.raises(DiskFull) as info:
        write_atomic(tmp_path / "x.dcm", writer)
    assert isinstance(info.value, OSError)
    assert info.value.errno == code
    assert str(tmp_path / "x.dcm") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_real_full_file_system_raises_disk_full_and_leaves_no_tmp(tiny_fs: Path) -> None:
    assert 0 < free_bytes(tiny_fs) <= 1024 * 1024
    write_atomic(tiny_fs / "small.dcm", b"x" * 1000)
    with pytest.raises(DiskFull) as info:
        write_atomic(tiny_fs / "studies" / "big.dcm", b"x" * (2 * 1024 * 1024))
    assert info.value.errno == errno.ENOSPC
    assert not (tiny_fs / "studies" / "big.dcm").exists()
    assert leftovers(tiny_fs / "studies") == []
    assert (tiny_fs / "small.dcm").read_bytes() == b"x" * 1000


def test_uid_paths_are_sanitised(tmp_path: Path) -> None:
    assert instance_path(tmp_path, "1.2.3", "1.2.3.4") == tmp_path / "instances" / "1.2.3" / "1.2.3.4.dcm"
    assert result_path(tmp_path, "1.2.3", "2.25.9") == tmp_path / "results" / "1.2.3" / "2.25.9.dcm"
    assert safe_uid("1.2.3\x00") == "1.2.3"
    evil = instance_path(tmp_path, "../../etc", "passwd/../..")
    assert evil.resolve().is_relative_to(tmp_path / "instances")
    assert set(evil.relative_to(tmp_path / "instances").as_posix()) <= set("0123456789./dcm")
    assert safe_uid("1.2.3a") != safe_uid("1.2.3b"), "different invalid UIDs must not share a file"
    with pytest.raises(ValueError, match="expected digits and dots"):
        safe_uid("  ")


def test_free_bytes_of_a_path_not_yet_made(tmp_path: Path) -> None:
    assert free_bytes(tmp_path / "not" / "yet") == free_bytes(tmp_path) > 0
