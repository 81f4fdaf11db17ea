"""Checkpoint bookkeeping: only checkpoints marked complete are resumed from or kept; pruning never removes the
newest complete checkpoint before its successor is complete."""

from tuneflow.training.checkpoints import COMPLETE, commit_checkpoint, last_complete_checkpoint


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


def _adapter(folder, **tensors):
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_an_empty_or_diverged_adapter_is_never_marked_complete(tmp_path):
    import pytest
    import torch

    from tuneflow.training.checkpoints import verify_adapter

    verify_adapter(_adapter(tmp_path / "checkpoint-1", a=torch.ones(2, 4), b=torch.zeros(4, 2)))  # fine
    empty = _adapter(tmp_path / "checkpoint-2", a=torch.ones(0), b=torch.ones(4, 2))
    with pytest.raises(RuntimeError, match=r"the adapter was written empty \(1 of 2 tensors\)"):
        commit_checkpoint(empty, keep=2)
    assert not (empty / COMPLETE).exists()
    nan = _adapter(tmp_path / "checkpoint-3", a=torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(RuntimeError, match="1 adapter tensors hold NaN or inf .* training diverged"):
        verify_adapter(nan)
