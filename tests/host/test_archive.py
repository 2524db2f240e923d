"""Save-file format: round trip, and every kind of damage refused before anything is returned."""

import os

import numpy as np
import pytest

import kvcl
from kvcl import archive
from kvcl.archive import ArchiveError, read_archive, write_archive


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "cache.kvcl"
    arrays = {"k0": np.arange(24, dtype=np.int8).reshape(2, 3, 4),
              "s0": np.linspace(0, 1, 6, dtype=np.float32), "h": np.arange(5, dtype=np.uint16)}
    write_archive(path, {"config": {"dtype": "int8"}}, arrays)
    return path, arrays


def test_round_trip_is_bit_exact(saved):
    path, arrays = saved
    meta, back = read_archive(path)
    assert meta == {"config": {"dtype": "int8"}}
    assert list(back) == list(arrays)
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(back[name], arrays[name])


@pytest.mark.parametrize("cut", [0, 5, 19, 40, -1, -7])
def test_truncated_file_is_refused(saved, cut):
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(ArchiveError, match="truncated"):
        read_archive(path)


def test_every_single_bit_flip_is_detected(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    for pos in range(0, len(raw), 7):
        damaged = bytearray(raw)
        damaged[pos] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(ArchiveError):
            read_archive(path)


def test_wrong_magic_and_version(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    path.write_bytes(b"NOTKVCL!" + bytes(raw[8:]))
    with pytest.raises(ArchiveError, match="not a kvcl save file"):
        read_archive(path)
    raw[8] = 9
    path.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match="format version 9 is not supported"):
        read_archive(path)


def test_trailing_bytes_refused(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ArchiveError, match="trailing bytes"):
        read_archive(path)


def test_missing_file(tmp_path):
    with pytest.raises(ArchiveError, match="no such file"):
        read_archive(tmp_path / "absent.kvcl")


def test_failed_save_leaves_the_old_file(saved, monkeypatch):
    path, arrays = saved
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk died mid-save")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        write_archive(path, {"other": 1}, {"x": np.ones(1000, np.float32)})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left behind"


@pytest.mark.parametrize("where,needle", [
    (lambda d: d / "missing" / "a.kvcl", "does not exist"),
    (lambda d: d, "got the folder"),
    (lambda d: d / "plain.txt" / "a.kvcl", "is a file, not a folder"),
])
def test_unwritable_path_is_refused_before_writing(tmp_path, where, needle):
    (tmp_path / "plain.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(kvcl.InvalidArgument, match=needle) as info:
        archive.write_archive(where(tmp_path), {"kind": "t"}, {"a": np.zeros(3)})
    assert str(info.value).startswith("path: ") and ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
