"""core.io.atomic_path: an artifact appears at its path whole or not at all, and what a killed run
left beside it is removed by the next write of the same output."""

from __future__ import annotations

import pytest

from lorapipe.core.io import atomic_path


def test_a_failed_write_leaves_neither_output_nor_temporary_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "gone.jsonl").write_text("old")
    with atomic_path(tmp_path / "raw", is_dir=True) as tmp:
        (tmp / "new.jsonl").write_text("new")
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["new.jsonl"]


def test_what_a_killed_run_left_is_removed_by_the_next_write_of_that_output(tmp_path):
    # as a SIGKILL leaves them: a temporary file of one output, a temporary folder of another
    (tmp_path / ".model.gguf.abc123.partial").write_bytes(b"x" * 10)
    (tmp_path / ".merged.k9.partial").mkdir()
    (tmp_path / ".merged.k9.partial" / "model.safetensors").write_bytes(b"x")
    with atomic_path(tmp_path / "model.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.k9.partial", "model.gguf"]
    with atomic_path(tmp_path / "merged", is_dir=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "model.gguf"]
