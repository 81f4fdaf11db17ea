"""Files and folders that appear whole or not at all (tuneflow.core.files)."""

import pytest

from tuneflow.core.files import is_staging, staged, staging_path


def test_a_folder_replaces_the_old_one_only_once_it_is_complete(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with staged(final) as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_text("half")
            raise RuntimeError("killed midway")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (final / "old.bin").is_file()
    with staged(final) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_staging_entry_left_by_a_killed_writer_is_cleared(tmp_path):
    final = tmp_path / "summary.json"
    leftover = staging_path(final)
    leftover.write_text("{half")
    assert is_staging(leftover)
    with staged(final) as tmp:
        assert not tmp.exists()
        tmp.write_text("{}")
    assert final.read_text() == "{}" and not leftover.exists()


def test_with_several_writers_of_one_entry_the_first_one_wins(tmp_path):
    entry = tmp_path / "entry"
    first, second = staged(entry, keep_existing=True), staged(entry, keep_existing=True)
    a, b = first.__enter__(), second.__enter__()
    assert a != b  # each writer stages under a name of its own
    for folder, text in ((a, "first"), (b, "second")):
        folder.mkdir()
        (folder / "data").write_text(text)
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert (entry / "data").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
