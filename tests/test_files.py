"""The atomic-write helpers: a file or folder appears whole or not at all, and a failed write
leaves the old one and no temporary behind."""

import pytest

from atedm_compile.files import folder_atomically, replacing, write_atomically


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "a.bin"
    write_atomically(target, b"old")
    with pytest.raises(RuntimeError, match="half way"):
        with replacing(target) as tmp, open(tmp, "wb") as handle:
            handle.write(b"new, but")
            raise RuntimeError("half way")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_file_written_over_the_block_appears_when_it_ends(tmp_path):
    target = tmp_path / "a.bin"
    with replacing(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"one")
        assert not target.exists()  # nobody sees it half-written
        with open(tmp, "ab") as handle:
            handle.write(b"two")
    assert target.read_bytes() == b"onetwo" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "graphs"
    target.mkdir()
    (target / "old.onnx").write_bytes(b"old")
    with folder_atomically(target) as tmp:
        (tmp / "new.onnx").write_bytes(b"new")
        assert (target / "old.onnx").exists()
    assert [p.name for p in target.iterdir()] == ["new.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["graphs"]


def test_a_failed_folder_leaves_the_old_one_and_nothing_else(tmp_path):
    target = tmp_path / "graphs"
    target.mkdir()
    (target / "old.onnx").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with folder_atomically(target) as tmp:
            (tmp / "new.onnx").write_bytes(b"new")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["graphs"]


def test_keep_existing_keeps_a_folder_another_process_made_first(tmp_path):
    target = tmp_path / "cache"
    with folder_atomically(target, keep_existing=True) as tmp:
        (tmp / "ours").write_bytes(b"ours")
        target.mkdir()  # another process finished the same folder meanwhile
        (target / "theirs").write_bytes(b"theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
