"""Checkpoint bookkeeping: only checkpoints marked complete are resumed from or kept; pruning never removes the
newest complete checkpoint before its successor is complete."""

from tuneflow.worker.train import COMPLETE, commit_checkpoint, last_complete_checkpoint


def _checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / COMPLETE).write_text(str(step))
    return folder


def test_resume_ignores_a_checkpoint_without_the_marker(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 12)
    _checkpoint(tmp_path, 16, complete=False)  # rank 0 wrote trainer_state.json, another rank was killed
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-12"  # numeric order, not text order


def test_commit_marks_then_prunes_to_the_limit(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 7, complete=False)
    newest = _checkpoint(tmp_path, 8, complete=False)
    commit_checkpoint(newest, keep=2)
    assert (newest / COMPLETE).read_text() == "8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert not list(newest.glob(".*tmp"))
