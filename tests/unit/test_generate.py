"""`tuneflow generate`: blocking and streaming answers are the same greedy text, without the prompt."""

import pytest

from tuneflow.cli.main import main
from tuneflow.modeling.demo import build


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny"), n_rows=30)["model"]


def _answer(capsys, *args):
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out.strip()


def test_stream_matches_blocking(model_dir, capsys):
    args = ["--model", str(model_dir), "--prompt", "Add 2 and 3.", "--max-new-tokens", "12", "--dtype", "fp32"]
    blocking = _answer(capsys, *args)
    streamed = _answer(capsys, *args, "--stream")
    assert blocking, "the model answered nothing"
    assert streamed == blocking
    assert "<|im_start|>" not in blocking and "Add 2 and 3." not in blocking  # prompt tokens are stripped
