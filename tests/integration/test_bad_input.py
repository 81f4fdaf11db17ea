"""Every bad input, with the message it must produce: the config, the model, the dataset.

Each is caught by `tuneflow validate` (the same checks the download stage runs before any weights are fetched),
ends with a non-zero exit and a message that names the key, file or row and says what to change, never a traceback.
`test_bad_input_fails_the_run_everywhere` runs one through `tuneflow run`: the flow fails in its first stage, every
MLflow run is FAILED and no weights were downloaded.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tuneflow.cli.main import main
from tuneflow.sources.hub import unsafe_names
from tuneflow.sources.preflight import hardware_problems

TUNEFLOW = Path(sys.executable).parent / "tuneflow"
GOOD_ROWS = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(12)]


def write(path: Path, rows) -> Path:
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


def validate(tmp_path: Path, config: dict, capsys, config_only: bool = False) -> tuple[int, str]:
    """`tuneflow validate` in this process: (exit code, stderr)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        code = main(["validate", "--config", str(path)] + (["--config-only"] if config_only else []))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def base_config(model: str | Path, dataset: str | Path) -> dict:
    return {"model": {"name_or_path": str(model)}, "dataset": {"name_or_path": str(dataset), "eval_size": 2}}


def merge(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


# --- config: reported in well under a second, before Prefect, torch or any model is imported -----------------

CONFIG_CASES = {
    "unknown key": ({"train.learning_rat": 1e-4},
                    "train.learning_rat: unknown key (did you mean 'train.learning_rate'?)"),
    "wrong type": ({"train.max_steps": "many"}, "train.max_steps: Input should be a valid integer"),
    "lora rank 0": ({"train.lora.rank": 0}, "train.lora.rank: Input should be greater than or equal to 1 (got 0)"),
    "negative learning rate": ({"train.learning_rate": -1e-4},
                               "train.learning_rate: Input should be greater than 0 (got -0.0001)"),
    "cutoff_len 0": ({"prep.cutoff_len": 0}, "prep.cutoff_len: Input should be greater than or equal to 8 (got 0)"),
    "unknown precision": ({"train.precision": "int4"},
                          "train.precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32'"),
    "qlora with zero3_offload": ({"train.deepspeed": "zero3_offload"},
                                 "train.deepspeed: zero3_offload cannot offload 4-bit weights; use zero3 with qlora"),
    "node 0's address typed by hand": ({"train.nnodes": 2, "train.master_addr": "10.0.0.1"},
                                       "train.master_addr: unknown key"),  # discovered by the nodes themselves
    "join timeout 0": ({"train.join_timeout": 0}, "train.join_timeout: Input should be greater than 0 (got 0)"),
    "custom code on a branch": ({"model.trust_remote_code": True},
                                "model.revision: trust_remote_code runs code from the repo; pin model.revision"),
    "run name with a path": ({"run_name": "../elsewhere"}, "run_name: String should match pattern"),
}


@pytest.mark.parametrize(("changes", "message"), CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config(tmp_path, capsys, changes, message):
    code, err = validate(tmp_path, merge(base_config("m", "d.json"), changes), capsys, config_only=True)
    assert code == 2 and message in err, err
    assert err.startswith("tuneflow: invalid config in ") and "Traceback" not in err


def test_settings_of_another_method_are_ignored_with_a_warning(tmp_path, capsys):
    """Switching train.method in a preset or the UI form never fails on the LoRA or freeze settings it carries."""
    code, err = validate(tmp_path, merge(base_config("m", "d.json"), {"train.method": "full", "train.lora.rank": 64,
                                                                      "train.freeze_trainable_layers": 4}),
                         capsys, config_only=True)
    assert code == 0, err
    assert "warning: train.lora applies to methods qlora and lora, not full: ignored" in err
    assert "warning: train.freeze_trainable_layers applies to method freeze only, not full: ignored" in err


def test_config_errors_come_before_any_heavy_import(tmp_path):
    """A typo costs a second, not a Prefect engine start or a model load."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(merge(base_config("m", "d.json"), {"train.lora.rnak": 8})))
    probe = ("import sys\nfrom tuneflow.cli.main import main\ncode = main(['run', '--config', sys.argv[1]])\n"
             "print(code, sorted(m for m in ('prefect', 'torch', 'transformers', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert "train.lora.rnak: unknown key (did you mean 'train.lora.rank'?)" in done.stderr


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    import torch

    from tuneflow.core.config import TuneflowConfig

    cfg = TuneflowConfig.model_validate(merge(base_config("m", "d.json"), {"train.precision": "bf16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the hardware question, answered as a T4 would
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert hardware_problems(cfg) == ["train.precision: bf16 is not supported by Tesla T4; use fp16"]
    for fine in ("fp16", "auto"):  # auto picks fp16 there
        train = cfg.train.model_copy(update={"precision": fine})
        assert hardware_problems(cfg.model_copy(update={"train": train})) == []


def test_hub_file_names_that_escape_the_snapshot_are_refused():
    names = ["config.json", "sub/model.safetensors", "../../.bashrc", "/etc/passwd", "a/../../b", "dir\\..\\x"]
    assert unsafe_names(names) == ["../../.bashrc", "/etc/passwd", "a/../../b", "dir\\..\\x"]


# --- the dataset (local files, a local model) ------------------------------------------------------------------

DATASET_CASES = {
    "not found": (lambda d: d / "missing.json", {}, "dataset.name_or_path: no such file or folder: {path}"),
    "bad JSONL": (lambda d: write(d / "rows.jsonl", json.dumps(GOOD_ROWS[0]) + "\n{oops\n"), {},
                  "{path}: line 2: not valid JSON"),
    "bad JSON": (lambda d: write(d / "rows.json", '[{"instruction": "a", "output": "b"},\n{oops}]'), {},
                 "{path}: line 2: not valid JSON"),
    "empty": (lambda d: write(d / "rows.json", []), {}, "{path}: the dataset has no rows"),
    "wrong format": (lambda d: write(d / "rows.json", GOOD_ROWS), {"dataset.format": "sharegpt"},
                     "{path}: row 1: field 'conversations' must be a non-empty list"),
    "missing field": (lambda d: write(d / "rows.json", GOOD_ROWS + [{"instruction": "q"}]), {},
                      "{path}: row 13: field 'output' is missing"),
    "mistyped field": (lambda d: write(d / "rows.json", GOOD_ROWS + [{"instruction": "q", "output": 3}]), {},
                       "{path}: row 13: field 'output' must be a string, got int"),
    "unknown role": (lambda d: write(d / "rows.json", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}] * 5), {"dataset.format": "sharegpt"},
        "{path}: row 1: field 'conversations[1].from' is 'bot'; expected one of human, user, gpt"),
    "empty response": (lambda d: write(d / "rows.json", GOOD_ROWS + [{"instruction": "q", "output": " "}]), {},
                       "{path}: row 13: field 'output': the assistant answer is empty"),
    "too few rows for the eval split": (lambda d: write(d / "rows.json", GOOD_ROWS[:5]), {"dataset.eval_size": 5},
                                        "dataset.eval_size: 5 leaves no training rows out of 5 valid rows; lower it"),
    "too many dropped": (lambda d: write(d / "rows.json", GOOD_ROWS[:4] + [{"instruction": "q"}] * 2),
                         {"prep.on_invalid": "drop"},
                         "{path}: 33% of rows are invalid, more than prep.max_invalid_fraction=0.1"),
}


@pytest.mark.parametrize(("make", "changes", "message"), DATASET_CASES.values(), ids=DATASET_CASES.keys())
def test_bad_dataset(tmp_path, capsys, tiny_assets, make, changes, message):
    path = make(tmp_path)
    code, err = validate(tmp_path, merge(base_config(tiny_assets["model"], path), changes), capsys)
    assert code == 2, err
    assert err.startswith("tuneflow: 1 problem found before downloading weights or training:"), err
    assert message.format(path=path) in err and "Traceback" not in err, err


def test_every_dataset_and_model_problem_at_once(tmp_path, capsys, tiny_assets):
    rows = write(tmp_path / "rows.json", GOOD_ROWS + [{"instruction": "q"}, {"instruction": "r", "output": 1}])
    config = merge(base_config(tmp_path / "no-model", rows), {})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and err.startswith("tuneflow: 2 problems found"), err
    assert f"model.name_or_path: no such file or folder: {tmp_path / 'no-model'}" in err
    assert "2 invalid rows for dataset.format=alpaca" in err
    assert f"{rows}: row 13: field 'output' is missing" in err and f"{rows}: row 14: field 'output' must be" in err


def test_every_problem_of_mixed_datasets_at_once_each_named_by_its_key(tmp_path, capsys, tiny_assets):
    """Two sources, each wrong in its own way (rows of another format; a column mapping the file does not fit), and
    an evaluation set that is not there: all reported by one validate, each naming its key."""
    sharegpt = write(tmp_path / "sharegpt.json", [{"conversations": [{"from": "human", "value": "q"},
                                                                     {"from": "gpt", "value": "a"}]}] * 12)
    config = {"model": {"name_or_path": str(tiny_assets["model"])},
              "datasets": [{"name_or_path": str(sharegpt), "weight": 3},
                           {"name_or_path": str(tiny_assets["data"]), "columns": {"output": "answer"}}],
              "eval_dataset": {"name_or_path": str(tmp_path / "none.json")}}
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and err.startswith("tuneflow: 3 problems found"), err
    assert "12 invalid rows for datasets.0.format=alpaca" in err and f"{sharegpt}: row 1: " in err
    assert (f"{tiny_assets['data']}: datasets.1.columns reads output from column 'answer', which the file lacks"
            in err), err
    assert f"eval_dataset.name_or_path: no such file or folder: {tmp_path / 'none.json'}" in err
    code, err = validate(tmp_path, {**config, "datasets": [{**config["datasets"][0], "weight": 0}]}, capsys)
    assert code == 2 and "datasets.0.weight: Input should be greater than 0" in err, err
    fixed = {**config, "datasets": [{**config["datasets"][0], "format": "sharegpt"}, {"name_or_path": str(
        tiny_assets["data"])}], "eval_dataset": {"name_or_path": str(sharegpt), "format": "sharegpt"}}
    code, err = validate(tmp_path, fixed, capsys)
    assert code == 0, err


def test_an_adapter_to_start_from_that_does_not_fit_is_refused_before_training(tmp_path, capsys, tiny_assets):
    import torch
    from safetensors.torch import save_file

    pairs = write(tmp_path / "pairs.json", [{"prompt": f"Add {i} and 1.", "chosen": f"{i + 1}", "rejected": "0"}
                                            for i in range(1, 13)])
    other = tmp_path / "adapter"
    other.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 999)},
              other / "adapter_model.safetensors")
    config = {"model": {"name_or_path": str(tiny_assets["model"])},
              "dataset": {"name_or_path": str(pairs), "format": "preference", "eval_size": 2},
              "train": {"objective": "dpo", "preference": {"init_adapter": str(other)}},
              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and (f"train.preference.init_adapter: {other} was trained on another model: its layer 0 "
                          "q_proj adapter takes 999 features") in err, err
    code, err = validate(tmp_path, merge(config, {"train.preference.init_adapter": "runs:/0123456789abcdef/adapter"}),
                         capsys)
    assert code == 2 and "train.preference.init_adapter: runs:/0123456789abcdef/adapter cannot be fetched" in err, err


def test_a_registered_model_that_is_not_there_is_refused_before_training(tmp_path, capsys, tiny_assets):
    """model.name_or_path: models:/… names a version of a registered model the MLflow store lacks; a dataset cannot
    be an MLflow model. Both said before anything is downloaded."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    config = merge(base_config("models:/assistant/1", tiny_assets["data"]), {"tracking.uri": store})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and (f"model.name_or_path: models:/assistant/1 is not a version of a registered model in MLflow "
                          f"at {store}") in err and "Traceback" not in err, err
    code, err = validate(tmp_path, merge(base_config(tiny_assets["model"], "models:/rows/1"), {"tracking.uri": store}),
                         capsys)
    assert code == 2 and ("dataset.name_or_path: models:/rows/1 names an MLflow model; a dataset is a local path or a "
                          "Hub repo") in err, err


def test_bad_benchmarks_are_refused_before_training_each_named(tmp_path, capsys, tiny_assets):
    bad_row = tmp_path / "mc.jsonl"
    bad_row.write_text(json.dumps({"question": "2 + 2?", "choices": ["4", "5"], "answer": "C"}) + "\n")
    config = merge(base_config(tiny_assets["model"], tiny_assets["data"]), {"eval.benchmarks": [
        {"task": "hellaswagg"}, {"name": "gone", "dataset": str(tmp_path / "none.jsonl")},
        {"name": "mine", "dataset": str(bad_row)}]})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and err.startswith("tuneflow: 3 problems found"), err
    assert ("eval.benchmarks: 'hellaswagg' is not a task or group of lm-evaluation-harness; did you mean "
            "hellaswag") in err
    assert f"eval.benchmarks gone: dataset: no such file or folder: {tmp_path / 'none.jsonl'}" in err
    assert (f"eval.benchmarks mine: 1 invalid rows in the multiple-choice set {bad_row}:" in err
            and f"{bad_row}: row 1: field 'answer' must be the index (0 to 1) or the letter (A to B) of a choice, "
                "got 'C'" in err), err


def test_a_column_mapping_the_file_does_not_fit_is_refused_before_training(tmp_path, capsys, tiny_assets):
    config = merge(base_config(tiny_assets["model"], tiny_assets["data"]), {"dataset.columns": {"output": "answer"}})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and "dataset.columns reads output from column 'answer', which the file lacks (its columns: " \
        "input, instruction, output)" in err, err
    code, err = validate(tmp_path, merge(config, {"dataset.columns": {"output": "output"}}), capsys)
    assert code == 0, err


def test_a_bad_eval_dataset_is_refused_before_training(tmp_path, capsys, tiny_assets):
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps([{"instruction": "q"}]))  # no answer
    config = merge(base_config(tiny_assets["model"], tiny_assets["data"]), {"eval_dataset": {"name_or_path": str(bad)}})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and f"{bad}: row 1: field 'output' is missing" in err, err
    gone = tmp_path / "gone.json"
    code, err = validate(tmp_path, merge(config, {"eval_dataset": {"name_or_path": str(gone)}}), capsys)
    assert code == 2 and f"eval_dataset.name_or_path: no such file or folder: {gone}" in err, err


def test_few_shot_prompts_longer_than_the_model_reads_are_refused(tmp_path, capsys, tiny_assets):
    """The harness would cut such a prompt from the left without a word; the tiny model reads 2048 tokens."""
    rows = [{"question": f"Question {i}: " + "the river and the stone " * 60 + "which is it?",
             "choices": ["river", "stone"], "answer": i % 2} for i in range(12)]
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = merge(base_config(tiny_assets["model"], tiny_assets["data"]), {"eval.benchmarks": [
        {"name": "long", "dataset": str(long), "num_fewshot": 8}]})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and err.startswith("tuneflow: 1 problem found"), err
    said = err.split("eval.benchmarks long: its longest 8-shot prompt is ")[1]
    assert int(said.split()[0]) > 2048 and "longer than the model's context of 2048; lower num_fewshot" in said, err
    code, err = validate(tmp_path, merge(config, {"eval.benchmarks": [
        {"name": "long", "dataset": str(long), "num_fewshot": 1}]}), capsys)
    assert code == 0, err


def test_a_config_that_cannot_fit_the_gpu_is_refused_before_any_download(tmp_path, capsys, tiny_assets):
    """train.gpu_memory names the GPUs training will get: the memory plan is checked against it in pre-flight."""
    config = merge(base_config(tiny_assets["model"], tiny_assets["data"]),
                   {"train.gpu_memory": "800MiB", "train.per_device_batch_size": 64, "prep.cutoff_len": 2048})
    code, err = validate(tmp_path, config, capsys)
    assert code == 2 and "train.per_device_batch_size: 64 needs ~" in err and "GPU; 1 fits" in err, err
    code, err = validate(tmp_path, merge(config, {"train.gpu_memory": "80GiB"}), capsys)
    assert code == 0, err


def test_answers_entirely_cut_off(tmp_path, tiny_assets):
    """Found while tokenizing (prepare), still before any model is loaded."""
    from tuneflow.core.config import TuneflowConfig
    from tuneflow.data.prepare import build

    rows = write(tmp_path / "rows.json", [{"instruction": "word " * 200, "output": "answer"}] * 6)
    cfg = TuneflowConfig.model_validate(merge(base_config(tiny_assets["model"], rows), {"prep.cutoff_len": 16}))
    with pytest.raises(ValueError, match="no train rows left: every answer lies past prep.cutoff_len=16"):
        build(cfg, tiny_assets["model"], [rows], tmp_path / "out")


# --- the model on the Hub --------------------------------------------------------------------------------------


def validate_cli(tmp_path: Path, config: dict, env: dict) -> subprocess.CompletedProcess:
    """`tuneflow validate` as a user runs it (huggingface_hub reads HF_ENDPOINT at import: a new process)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([str(TUNEFLOW), "validate", "--config", str(path)], capture_output=True, text=True,
                          env={**base, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), **env}, timeout=300)


MODEL_CASES = {
    "repo not found": ({"model.name_or_path": "tiny-org/no-such-model"},
                       "model.name_or_path: tiny-org/no-such-model is neither a local path nor a repo on the Hub"),
    "revision not found": ({"model.revision": "no-such-branch"},
                           "model.revision: 'no-such-branch' is not a branch, tag or commit of tiny-org/tiny-llama"),
    "no chat template": ({"model.name_or_path": "tiny-org/no-chat-template"},
                         "model.chat_template: tiny-org/no-chat-template has no chat template"),
    "pickle weights only": ({"model.name_or_path": "tiny-org/pickle-only"},
                            "model.name_or_path: tiny-org/pickle-only has only pickle weights (pytorch_model.bin); "
                            "tuneflow loads safetensors only"),
    "custom code, not trusted": ({"model.name_or_path": "tiny-org/custom-code"},
                                 "model.trust_remote_code: tiny-org/custom-code needs Python code from its repo"),
}


@pytest.mark.slow
@pytest.mark.parametrize(("changes", "message"), MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_bad_model_on_the_hub(tmp_path, hub_mirror, tiny_assets, changes, message):
    config = merge(base_config(hub_mirror.model_id, tiny_assets["data"]), changes)
    done = validate_cli(tmp_path, config, {"HF_ENDPOINT": hub_mirror.endpoint})
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors")), "weights were downloaded before the checks"


@pytest.mark.slow
def test_a_benchmark_set_or_a_judge_missing_from_the_hub_is_named(tmp_path, hub_mirror, tiny_assets):
    config = merge(base_config(hub_mirror.model_id, tiny_assets["data"]), {
        "eval.benchmarks": [{"name": "skills", "dataset": "tiny-org/no-such-mc"},
                            {"name": "pinned", "dataset": hub_mirror.mc_id, "revision": "no-such-tag"}],
        "eval.judge": {"model": "tiny-org/no-such-judge"}})
    done = validate_cli(tmp_path, config, {"HF_ENDPOINT": hub_mirror.endpoint})
    assert done.returncode == 2 and "tuneflow: 3 problems found" in done.stderr, done.stderr
    for said in ("eval.benchmarks skills: dataset: tiny-org/no-such-mc is neither a local path nor a repo on the Hub",
                 f"eval.benchmarks pinned: revision: 'no-such-tag' is not a branch, tag or commit of "
                 f"{hub_mirror.mc_id}",
                 "eval.judge.model: tiny-org/no-such-judge is neither a local path nor a repo on the Hub (models)"):
        assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_configured_chat_template_stands_in_for_a_missing_one(tmp_path, hub_mirror, tiny_assets):
    from tuneflow.modeling.demo import CHATML_TEMPLATE

    config = merge(base_config("tiny-org/no-chat-template", tiny_assets["data"]),
                   {"model.chat_template": CHATML_TEMPLATE})
    done = validate_cli(tmp_path, config, {"HF_ENDPOINT": hub_mirror.endpoint})
    assert done.returncode == 0, done.stderr
    assert "ready to run: model tiny-org/no-chat-template (commit " in done.stdout


CANARY = "hf_tuneflowGatedCanary0123456789abcdef"


def gated_hub(upstream: str) -> http.server.ThreadingHTTPServer:
    """The Hub's behaviour for a gated repo in front of ``upstream`` (olah): a request that carries the token
    CANARY is passed through, any other is refused as the Hub refuses it (401, X-Error-Code: GatedRepo)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _serve(self):
            if self.headers.get("Authorization") != f"Bearer {CANARY}":
                self.send_response(401)
                self.send_header("X-Error-Code", "GatedRepo")
                self.send_header("X-Error-Message", "Access to this repo is restricted.")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept", "accept-encoding")}
            request = urllib.request.Request(upstream + self.path, headers=headers, method=self.command)
            try:
                response = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as err:
                response = err
            body = response.read()
            self.send_response(response.status)
            for key, value in response.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "server", "date"):
                    self.send_header(key, value)
            if "Content-Length" not in response.headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _serve

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
def test_gated_model_needs_a_token_from_the_environment_or_a_prefect_secret(tmp_path, hub_mirror, tiny_assets,
                                                                           prefect_api):
    from prefect.blocks.system import Secret

    Secret(value=CANARY).save("tuneflow-test-hub-token", overwrite=True)
    server = gated_hub(hub_mirror.endpoint)
    endpoint = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "PREFECT_API_URL": prefect_api}
    config = base_config(hub_mirror.model_id, tiny_assets["data"])
    try:
        refused = validate_cli(tmp_path / "none", config, endpoint)
        from_env = validate_cli(tmp_path / "env", config, {**endpoint, "HF_TOKEN": CANARY})
        secret = merge(config, {"hub.token_secret": "tuneflow-test-hub-token"})
        from_block = validate_cli(tmp_path / "block", secret, endpoint)
        no_block = validate_cli(tmp_path / "no-block", merge(config, {"hub.token_secret": "no-such-block"}), endpoint)
    finally:
        server.shutdown()
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (f"model.name_or_path: {hub_mirror.model_id} is gated; accept its terms on the Hub, then set HF_TOKEN"
            in refused.stderr), refused.stderr
    for done in (from_env, from_block):
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ready to run: model {hub_mirror.model_id} (commit {hub_mirror.model_sha})" in done.stdout
        assert CANARY not in done.stdout + done.stderr
    assert no_block.returncode == 2
    assert "hub.token_secret: there is no Prefect Secret block named 'no-such-block'" in no_block.stderr


# --- through the whole pipeline ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_input_fails_the_run_everywhere(tmp_path, hub_mirror, prefect_api, tiny_assets):
    from mlflow import MlflowClient

    rows = write(tmp_path / "rows.json", GOOD_ROWS + [{"instruction": "q"}])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = merge(base_config("tiny-org/no-chat-template", rows),
                   {"output_dir": str(tmp_path / "runs"), "tracking.uri": uri})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_"))}
    env.update(HF_ENDPOINT=hub_mirror.endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), PREFECT_API_URL=prefect_api)
    done = subprocess.run([str(TUNEFLOW), "run", "--config", str(path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    headline = [line for line in done.stderr.splitlines() if line.startswith("tuneflow: ")]
    assert headline == ["tuneflow: run failed: PreflightError: 2 problems found before downloading weights or "
                        "training:"], done.stderr[-3000:]
    assert "model.chat_template: tiny-org/no-chat-template has no chat template" in done.stderr
    assert f"{rows}: row 13: field 'output' is missing" in done.stderr
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors")), "weights were downloaded before the checks"

    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] == "download"
    assert "no chat template" in summary["stages"]["download"]["error"]
    client = MlflowClient(uri)
    runs = client.search_runs([summary["mlflow"]["experiment_id"]])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == sorted(
        [(Path(summary["run_dir"]).name, "FAILED"), ("download", "FAILED")])
