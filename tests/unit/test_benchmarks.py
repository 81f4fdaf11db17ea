"""eval.benchmarks: a team's multiple-choice set read and checked row by row, and scored by lm-evaluation-harness on
a model already loaded (the tiny one here)."""

import json
import logging

import pytest

from tests.support.multiple_choice import hub_folder, questions, write_jsonl
from tuneflow.data.formats import DatasetError
from tuneflow.data.multiple_choice import load_questions
from tuneflow.modeling.benchmarks import Benchmark, score, write_team_task


def test_answers_as_index_or_letter_and_choices_in_a_csv_cell(tmp_path):
    rows = questions(4) + questions(4, letters=True)
    assert [r["answer"] for r in load_questions(write_jsonl(rows, tmp_path / "mc.jsonl"), "test")] == \
        [r["answer"] for r in questions(4)] * 2
    csv = tmp_path / "mc.csv"
    csv.write_text('question,choices,answer\nWhat is 1 plus 1?,"[""2"", ""3""]",A\n')
    assert load_questions(csv, "test") == [{"question": "What is 1 plus 1?", "choices": ["2", "3"], "answer": 0}]


def test_a_folder_is_read_by_split(tmp_path):
    folder = hub_folder(tmp_path / "repo", n=6)
    assert len(load_questions(folder, "test")) == 6 and len(load_questions(folder, "train")) == 4
    with pytest.raises(DatasetError, match="no data file of split 'validation'"):
        load_questions(folder, "validation")


def test_every_bad_row_is_named_with_its_file_and_row(tmp_path):
    rows = questions(3)
    rows[0]["answer"] = 7
    rows[1]["choices"] = ["only one"]
    del rows[2]["question"]
    path = write_jsonl(rows + questions(2), tmp_path / "mc.jsonl")
    with pytest.raises(DatasetError) as info:
        load_questions(path, "test")
    said = str(info.value)
    assert said.startswith(f"3 invalid rows in the multiple-choice set {path}:"), said
    assert f"{path}: row 1: field 'answer' must be the index (0 to 3) or the letter (A to D) of a choice, got 7" in said
    assert f"{path}: row 2: field 'choices' must be a list of 2 to 26 non-empty strings" in said
    assert f"{path}: row 3: field 'question' is missing or empty" in said


def test_the_harness_scores_the_set_on_the_loaded_model(tmp_path, tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    data = write_jsonl(questions(10), tmp_path / "data" / "arith.jsonl")
    task = write_team_task("arith-set", data, tmp_path / "tasks")
    benches = [Benchmark("arith-set", task, num_fewshot=2, limit=6)]
    metrics, samples = score(model, tokenizer, benches, tmp_path / "tasks", batch_size=4)
    assert set(metrics) == {"bench.arith-set.acc", "bench.arith-set.acc_stderr", "bench.arith-set.acc_norm",
                            "bench.arith-set.acc_norm_stderr"}
    logged = samples["arith-set"]
    assert len(logged) == 6 and {s["task"] for s in logged} == {task}
    assert metrics["bench.arith-set.acc"] == pytest.approx(sum(s["acc"] for s in logged) / 6)
    assert [json.loads(s["target"]) for s in logged] == [r["answer"] for r in questions(6)]
    again, _ = score(model, tokenizer, benches, tmp_path / "tasks", batch_size=1)  # batched or not: the same scores
    assert again == pytest.approx(metrics)


def test_an_unknown_harness_task_is_named_with_close_ones():
    from tuneflow.core.config import TuneflowConfig
    from tuneflow.sources.benchmarks import benchmark_problems

    cfg = TuneflowConfig.model_validate({"model": {"name_or_path": "m"}, "dataset": {"name_or_path": "d"},
                                         "eval": {"benchmarks": [{"task": "arc-easy"}, {"task": "arc_easy"}]}})
    assert benchmark_problems(cfg, logging.getLogger("t")) == [
        "eval.benchmarks: 'arc-easy' is not a task or group of lm-evaluation-harness; did you mean arc_easy, "
        "arc_eu_easy, arc_ca_easy?"]


@pytest.mark.slow  # the harness's task index and datasets' retries: ~40 s
def test_a_harness_task_whose_data_cannot_be_fetched_is_named(tmp_path, tiny_assets):
    """arc_easy's data comes from the Hub: with the Hub unreachable, scoring stops before the model runs, naming
    the benchmark (not a stack trace from datasets)."""
    import os
    import subprocess
    import sys

    from tuneflow.core.ports import free_port

    script = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "from tuneflow.modeling.benchmarks import Benchmark, BenchmarkUnavailable, score\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tiny_assets['model'])!r})\n"
              f"t = AutoTokenizer.from_pretrained({str(tiny_assets['model'])!r})\n"
              "try:\n    score(m, t, [Benchmark('arc', 'arc_easy', limit=2)], None, 2)\n"
              "except BenchmarkUnavailable as exc:\n    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("eval.benchmarks arc: its data cannot be loaded ("), done.stdout + done.stderr[-3000:]
