"""The torchrun launcher: a failing rank fails the launch with that rank's own error message."""

import json

import pytest

from tuneflow.training.launch.launcher import WorkerFailed, dead_ranks, launch, rank_errors


def test_failed_ranks_are_named_with_their_error(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "config": {"dataset": {"name_or_path": "unused"}, "train": {"deepspeed": "none"}},
        "model_dir": str(tmp_path / "no-such-model"),
        "data_dir": str(tmp_path / "no-such-data"),
        "output_dir": str(tmp_path),
    }))
    lines = []
    with pytest.raises(WorkerFailed) as err:
        launch(spec, nproc=2, master_port=0, env={}, on_line=lines.append)
    message = str(err.value)
    assert "rank 0:" in message and "rank 1:" in message, message
    assert "no-such-model" in message, message  # the worker's own error, not just torchrun's exit code
    assert any("launching:" in line for line in lines)  # worker output is streamed to the caller


def test_rank_errors_lowest_rank_first(tmp_path):
    for rank, text in ((10, "OSError: disk full"), (2, "RuntimeError: boom")):
        (tmp_path / f"rank{rank}.txt").write_text(f"{text}\n\ntraceback...")
    assert rank_errors(tmp_path) == ["rank 2: RuntimeError: boom", "rank 10: OSError: disk full"]


TORCHRUN_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
tuneflow.training.worker FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-22_00:37:12
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 16819)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 16819
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_00:37:11
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 16821)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 16821
======================================================="""


def test_killed_rank_is_named_from_torchruns_report():
    # rank 0 got the launcher's own SIGTERM after rank 1 died: only rank 1 is named
    assert dead_ranks(TORCHRUN_REPORT) == ["rank 1: exit code -9 (SIGKILL)"]
    assert dead_ranks("no report here") == []


def test_the_rendezvous_store_binds_an_address_of_this_machine_only():
    from tuneflow.training.launch.torchrun import _listener

    listener = _listener("127.0.0.1", 0)
    try:
        assert listener.getsockname()[0] == "127.0.0.1"
    finally:
        listener.close()
    # A pod's DNS name (may not resolve yet at start) or an address this machine lacks (NAT): torchrun's own way.
    assert _listener("trainjob-node-0-0.trainjob", 0) is None
    assert _listener("192.0.2.1", 0) is None  # TEST-NET-1, never local
