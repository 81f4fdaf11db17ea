"""The config tree: presets validate, and every mistake a user can make is reported with the key it belongs to."""

from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from tuneflow.core.config import TuneflowConfig, parse_size
from tuneflow.core.loading import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs").glob("*.yml")])
SCHEDULERS = [
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
]
MINIMAL = {"dataset": {"name_or_path": "data/train.json"}}


def with_(**sections) -> dict:
    """The minimal valid config plus ``sections`` (a fresh dict each time)."""
    data = {"dataset": dict(MINIMAL["dataset"])}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    return data


def config_error(data: dict | None = None, path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=overrides, data=data)
    return str(info.value)


def problems(message: str) -> dict[str, str]:
    """'  - dotted.key: what is wrong' lines of a ConfigError -> {dotted.key: what is wrong}."""
    out = {}
    for line in message.splitlines():
        if line.startswith("  - "):
            key, _, what = line[4:].partition(": ")
            out.setdefault(key, "")
            out[key] += what
    return out


def dotted_keys(model: type[BaseModel] = TuneflowConfig, prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= dotted_keys(field.annotation, f"{prefix}{name}.")
        item = get_args(field.annotation)[0] if get_origin(field.annotation) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel):  # eval.benchmarks: the fields of each entry
            keys |= dotted_keys(item, f"{prefix}{name}[].")
        for optional in get_args(field.annotation):  # eval.judge: a section that is off unless set
            if isinstance(optional, type) and issubclass(optional, BaseModel) and item is None:
                keys |= dotted_keys(optional, f"{prefix}{name}.")
    return keys


# --- presets -----------------------------------------------------------------------------------------------


def test_presets_exist():
    assert PRESETS, f"no YAML presets found under {ROOT / 'configs'}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_validates(preset):
    cfg = load_config(str(preset))
    assert isinstance(cfg, TuneflowConfig)
    assert cfg.dataset.name_or_path


def test_minimal_config_gets_documented_defaults():
    cfg = load_config(data=MINIMAL)
    assert cfg.train.method == "qlora"
    assert cfg.train.lora.target_modules == "all-linear"
    assert cfg.train.lr_scheduler == "cosine"
    assert cfg.train.nproc_per_node == "auto"
    assert cfg.dataset.format == "alpaca"


# --- unknown keys ------------------------------------------------------------------------------------------


def test_unknown_top_level_key_is_named_with_suggestion():
    found = problems(config_error({**MINIMAL, "modle": {"name_or_path": "x"}}))
    assert list(found) == ["modle"]
    assert "unknown key" in found["modle"]
    assert "did you mean 'model'" in found["modle"]


def test_unknown_nested_key_is_named_with_dotted_suggestion():
    found = problems(config_error(with_(train={"learnign_rate": 1e-4})))
    assert list(found) == ["train.learnign_rate"]
    assert "unknown key" in found["train.learnign_rate"]
    assert "did you mean 'train.learning_rate'" in found["train.learnign_rate"]


def test_unknown_key_two_levels_deep_is_named_with_dotted_suggestion():
    found = problems(config_error(with_(train={"lora": {"rnak": 8}})))
    assert list(found) == ["train.lora.rnak"]
    assert "did you mean 'train.lora.rank'" in found["train.lora.rnak"]


def test_unknown_key_without_close_match_has_no_suggestion():
    found = problems(config_error(with_(train={"zzzzzz": 1})))
    assert found == {"train.zzzzzz": "unknown key"}


# --- wrong types and out-of-range values -------------------------------------------------------------------

BAD_VALUES = [
    ("train.lora.rank", with_(train={"lora": {"rank": 0}})),
    ("train.lora.rank", with_(train={"lora": {"rank": "sixteen"}})),
    ("train.lora.dropout", with_(train={"lora": {"dropout": 1.0}})),
    ("train.learning_rate", with_(train={"learning_rate": -1e-4})),
    ("train.learning_rate", with_(train={"learning_rate": 0})),
    ("train.learning_rate", with_(train={"learning_rate": "fast"})),
    ("prep.cutoff_len", with_(prep={"cutoff_len": 0})),
    ("prep.cutoff_len", with_(prep={"cutoff_len": 512.5})),
    ("dataset.eval_size", {"dataset": {"name_or_path": "d.json", "eval_size": 0}}),
    ("dataset.eval_size", {"dataset": {"name_or_path": "d.json", "eval_size": -0.1}}),
    ("dataset.eval_size", {"dataset": {"name_or_path": "d.json", "eval_size": 2.5}}),  # a count must be whole
    ("dataset.format", {"dataset": {"name_or_path": "d.json", "format": "csv"}}),
    ("dataset.name_or_path", {"dataset": {"name_or_path": ""}}),
    ("dataset", {}),  # required
    ("train.nproc_per_node", with_(train={"nproc_per_node": 0})),
    ("train.nproc_per_node", with_(train={"nproc_per_node": -2})),
    ("train.nproc_per_node", with_(train={"nproc_per_node": "two"})),
    ("train.deepspeed", with_(train={"deepspeed": "zero4"})),
    ("train.deepspeed", with_(train={"deepspeed": "ds_config.yaml"})),
    ("export.max_shard_size", with_(export={"max_shard_size": "2 bananas"})),
    ("export.max_shard_size", with_(export={"max_shard_size": "2"})),
    ("train.lr_scheduler", with_(train={"lr_scheduler": "cosinus"})),
    ("train.method", with_(train={"method": "qlora4"})),
    ("train.precision", with_(train={"precision": "int8"})),
    ("train.gradient_checkpointing", with_(train={"gradient_checkpointing": "maybe"})),
    ("train.master_port", with_(train={"master_port": 70000})),
    ("run_name", with_(run_name="my run/1")),
    ("train", with_(train="oops")),
]


@pytest.mark.parametrize(("key", "data"), BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_VALUES)])
def test_bad_value_is_rejected_naming_its_key(key, data):
    message = config_error(data)
    found = problems(message)
    assert found, message
    # Every problem line is about the bad key, and names it exactly as the user writes it (no pydantic
    # union-member suffixes such as '.int' or "literal['auto']", which are not keys a user can set).
    assert set(found) == {key}, message


def test_valid_edge_values_are_accepted():
    cfg = load_config(
        data={
            "dataset": {"name_or_path": "d.json", "eval_size": 24},
            "train": {"nproc_per_node": 2, "deepspeed": "my/ds.json", "lora": {"rank": 1, "dropout": 0}},
            "prep": {"cutoff_len": 8},
            "export": {"max_shard_size": "1.5GiB"},
        }
    )
    assert cfg.dataset.eval_size == 24
    assert cfg.train.nproc_per_node == 2
    assert cfg.train.deepspeed == "my/ds.json"
    assert cfg.prep.cutoff_len == 8


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2_000_000_000), ("500MB", 500_000_000), ("300KB", 300_000), ("1.5GiB", 3 * 2**29), ("10 mib", 10 * 2**20)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2 bananas", "2", "GB", "-1GB", "2TB", ""])
def test_parse_size_rejects_non_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_every_reported_problem_at_once():
    message = config_error(
        {
            "dataset": {"name_or_path": "d.json", "eval_size": 0},
            "prep": {"cutoff_len": 0},
            "train": {"learning_rate": -1, "lora": {"rank": 0}, "learnign_rate": 1e-4, "deepspeed": "zero9"},
            "export": {"max_shard_size": "2 bananas"},
        }
    )
    assert set(problems(message)) == {
        "dataset.eval_size",
        "prep.cutoff_len",
        "train.learning_rate",
        "train.lora.rank",
        "train.learnign_rate",
        "train.deepspeed",
        "export.max_shard_size",
    }, message


def test_reported_keys_are_real_config_keys():
    # A union field with a wrong type is the case where pydantic adds member tags to the error location.
    message = config_error(
        with_(train={"nproc_per_node": "two", "lora": {"target_modules": "q_proj"}}, export={"dtype": "int4"})
    )
    known = dotted_keys()
    assert set(problems(message)) <= known, message


# --- learning-rate schedulers ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_is_accepted(scheduler):
    cfg = load_config(data=with_(train={"lr_scheduler": scheduler, "eval_steps": 10}))
    assert cfg.train.lr_scheduler == scheduler


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_is_one_transformers_knows(scheduler):
    from transformers import SchedulerType

    assert SchedulerType(scheduler).value == scheduler


def test_scheduler_list_matches_the_config():

    from tuneflow.core.config import LrScheduler

    assert set(get_args(LrScheduler)) == set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", [s for s in SCHEDULERS if s != "reduce_lr_on_plateau"])
def test_schedulers_need_no_eval_loss(scheduler):
    assert load_config(data=with_(train={"lr_scheduler": scheduler})).train.eval_steps == 0


def test_reduce_on_plateau_without_eval_steps_is_rejected():
    message = config_error(with_(train={"lr_scheduler": "reduce_lr_on_plateau"}))
    assert "train.lr_scheduler" in message
    assert "train.eval_steps" in message


# --- cross-field checks ------------------------------------------------------------------------------------


def test_precision_defaults_to_auto():
    assert load_config(data=with_()).train.precision == "auto"


@pytest.mark.parametrize("method", ["qlora", "lora", "full", "freeze"])
def test_fp32_compute_is_fine_for_every_method(method):  # qlora: the weights stay 4-bit NF4
    assert load_config(data=with_(train={"method": method, "precision": "fp32"})).train.precision == "fp32"


def test_qlora_with_zero3_offload_is_rejected():
    message = config_error(with_(train={"method": "qlora", "deepspeed": "zero3_offload"}))
    assert "train.deepspeed" in message
    assert "zero3_offload" in message


def test_zero3_offload_is_fine_without_qlora_and_zero3_is_fine_with_it():
    assert load_config(data=with_(train={"method": "lora", "deepspeed": "zero3_offload"})).train.deepspeed == (
        "zero3_offload"
    )
    assert load_config(data=with_(train={"method": "qlora", "deepspeed": "zero3"})).train.deepspeed == "zero3"


def test_full_fp16_without_deepspeed_is_rejected():
    message = config_error(with_(train={"method": "full", "precision": "fp16", "deepspeed": "none"}))
    assert "train.precision" in message


def test_two_cross_field_problems_are_both_reported():
    message = config_error(with_(train={"method": "qlora", "lr_scheduler": "reduce_lr_on_plateau",
                                        "deepspeed": "zero3_offload"}))
    assert "train.lr_scheduler" in message
    assert "train.deepspeed" in message


# --- YAML files and --set overrides ------------------------------------------------------------------------

PRESET_YAML = """\
run_name: t
dataset:
  name_or_path: data/train.json
train:
  learning_rate: 2.0e-4
  lora: {rank: 16, alpha: 32, target_modules: all-linear}
"""


def test_set_overrides_parse_yaml_values_and_take_effect(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PRESET_YAML)
    cfg = load_config(
        str(path),
        overrides=[
            "train.learning_rate=1e-4",
            "train.lora.target_modules=[q_proj, v_proj]",
            "train.gradient_checkpointing=false",
            "train.nproc_per_node=2",
            "dataset.name_or_path=data/other.json",
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is False
    assert cfg.train.nproc_per_node == 2
    assert cfg.dataset.name_or_path == "data/other.json"
    # Overriding one key of a section keeps the others from the file.
    assert cfg.train.lora.rank == 16 and cfg.train.lora.alpha == 32
    assert cfg.run_name == "t"


def test_set_override_can_create_a_missing_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PRESET_YAML)
    cfg = load_config(str(path), overrides=["eval.max_new_tokens=16"])
    assert cfg.eval.max_new_tokens == 16


def test_bad_set_override_is_reported_with_the_path_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PRESET_YAML)
    message = config_error(path=str(path), overrides=["train.lora.rank=0", "train.learnign_rate=1e-4"])
    assert str(path) in message
    found = problems(message)
    assert set(found) == {"train.lora.rank", "train.learnign_rate"}
    assert "did you mean 'train.learning_rate'" in found["train.learnign_rate"]


def test_set_without_equals_sign_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PRESET_YAML)
    assert "train.learning_rate" in config_error(path=str(path), overrides=["train.learning_rate"])


def test_missing_config_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    assert str(path) in config_error(path=str(path))


def test_invalid_yaml_names_the_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset:\n  name_or_path: [unclosed\ntrain: {\n")
    message = config_error(path=str(path))
    assert str(path) in message
    assert "YAML" in message


def test_yaml_that_is_not_a_mapping_names_the_path(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert str(path) in config_error(path=str(path))


def test_invalid_values_in_a_file_name_the_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PRESET_YAML.replace("rank: 16", "rank: 0"))
    message = config_error(path=str(path))
    assert str(path) in message
    assert set(problems(message)) == {"train.lora.rank"}


# --- the Prefect UI form -----------------------------------------------------------------------------------


def test_every_field_in_the_json_schema_has_a_description():
    schema = TuneflowConfig.model_json_schema()
    missing, seen = [], 0

    def walk(node: dict, where: str) -> None:
        nonlocal seen
        for name, prop in node.get("properties", {}).items():
            seen += 1
            if not str(prop.get("description", "")).strip():
                missing.append(f"{where}{name}")

    walk(schema, "")
    for name, definition in schema.get("$defs", {}).items():
        walk(definition, f"{name}.")
    # Every field of every section is in the schema (so the walk saw them all); a section used under two keys
    # (dataset and datasets[]) is one definition of the schema; a sweep.space range is a mapping's value, no key.
    ranges = len(schema["$defs"]["Range"]["properties"])
    assert seen - ranges == len({key.replace("datasets[].", "dataset.") for key in dotted_keys()})
    assert not missing, f"fields without a description (blank in the Prefect form): {missing}"


def test_trust_remote_code_requires_a_pinned_commit():
    base = {"dataset": {"name_or_path": "d.json"}}
    with pytest.raises(ConfigError, match="model.revision: trust_remote_code .* full commit SHA"):
        load_config(data={**base, "model": {"name_or_path": "org/m", "trust_remote_code": True}})
    sha = "0123456789abcdef0123456789abcdef01234567"
    cfg = load_config(data={**base, "model": {"name_or_path": "org/m", "trust_remote_code": True, "revision": sha}})
    assert cfg.model.revision == sha


@pytest.mark.parametrize(("benchmarks", "key", "said"), [
    ([{"name": "x"}], "eval.benchmarks.0", "a benchmark is either a harness task (task: mmlu) or your own set"),
    ([{"task": "mmlu", "dataset": "d.jsonl"}], "eval.benchmarks.0", "a benchmark is either a harness task"),
    ([{"dataset": "d.jsonl"}], "eval.benchmarks.0", "benchmark with dataset d.jsonl: name it (name: my-skills)"),
    ([{"task": "mmlu"}, {"task": "mmlu", "num_fewshot": 5}], "eval.benchmarks",
     "two benchmarks named mmlu: their metrics would overwrite each other"),
    ([{"name": "my skills", "dataset": "d.jsonl"}], "eval.benchmarks.0.name", "should match pattern"),
    ([{"task": "mmlu", "num_fewshot": 26}], "eval.benchmarks.0.num_fewshot", "less than or equal to 25"),
    ([{"task": "mmlu"}, {"task": "arc_easy", "num_fewshots": 5}], "eval.benchmarks.1.num_fewshots",
     "unknown key (did you mean 'eval.benchmarks.1.num_fewshot'?)"),
])
def test_a_benchmark_is_a_harness_task_or_a_named_set(benchmarks, key, said):
    found = problems(config_error(with_(eval={"benchmarks": benchmarks})))
    assert said in found[key], found


def test_benchmarks_are_no_part_of_the_config_hash():
    """Scoring more benchmarks changes no trained model: retrain does not train again for it."""
    from tuneflow.core.params import config_hash

    plain = load_config(data=with_())
    scored = load_config(data=with_(eval={"benchmarks": [{"task": "mmlu", "num_fewshot": 5}]}))
    assert [b.key for b in scored.eval.benchmarks] == ["mmlu"] and config_hash(plain) == config_hash(scored)


# --- several datasets ------------------------------------------------------------------------------------------

TWO_SOURCES = [{"name_or_path": "org/a", "weight": 3}, {"name_or_path": "b.csv", "columns": {"output": "answer"}}]


def test_datasets_list_the_sources_with_their_keys():
    cfg = load_config(data={"datasets": TWO_SOURCES, "eval_dataset": {"name_or_path": "org/e"}})
    assert [(key, s.name_or_path, s.weight) for key, s in cfg.sources] == [("datasets.0", "org/a", 3.0),
                                                                            ("datasets.1", "b.csv", 1.0)]
    assert [key for key, _ in cfg.all_sources] == ["datasets.0", "datasets.1", "eval_dataset"]
    one = load_config(data=with_())
    assert [key for key, _ in one.sources] == ["dataset"] and one.sources[0][1] is one.dataset


@pytest.mark.parametrize(("data", "key", "said"), [
    ({"dataset": {"name_or_path": "d.json"}, "datasets": TWO_SOURCES}, "dataset", "not both"),
    ({}, "dataset", "neither is set"),
    ({"datasets": [{"name_or_path": "org/a", "weight": 0}]}, "datasets.0.weight", "greater than 0"),
    ({"datasets": [{"name_or_path": "org/a", "weight": -1}, {"name_or_path": "org/b", "max_samples": 0}]},
     "datasets.1.max_samples", "greater than or equal to 1"),
    ({"datasets": [{"name_or_path": "org/a", "columns": {"answer": "x"}}]}, "datasets.0",
     "columns: answer is no field of format alpaca"),
])
def test_bad_datasets_are_named_by_their_key(data, key, said):
    found = problems(config_error(data))
    assert said in found[key], found


def test_set_reaches_an_entry_of_datasets():
    cfg = load_config(data={"datasets": TWO_SOURCES}, overrides=["datasets.1.weight=2", "datasets.0.split=train"])
    assert cfg.datasets[1].weight == 2 and cfg.datasets[0].split == "train"
    assert "'datasets' has 2 entries; '5' is none" in config_error({"datasets": TWO_SOURCES},
                                                                  overrides=["datasets.5.weight=2"])


def test_the_mix_is_part_of_the_config_hash_and_the_revisions_are_not():
    from tuneflow.core.params import config_hash, flatten

    cfg = load_config(data={"datasets": TWO_SOURCES})
    assert flatten(cfg)["datasets.0.weight"] == "3.0" and flatten(cfg)["datasets.1.columns"] == '{"output": "answer"}'
    pinned = load_config(data={"datasets": TWO_SOURCES}, overrides=["datasets.1.revision=abc123"])
    assert config_hash(pinned) == config_hash(cfg)
    for change in ("datasets.1.weight=2", "datasets.0.max_samples=10", "prep.mix_strategy=concat"):
        assert config_hash(load_config(data={"datasets": TWO_SOURCES}, overrides=[change])) != config_hash(cfg), change


# --- preference tuning -----------------------------------------------------------------------------------------

PAIRS = {"name_or_path": "pairs.jsonl", "format": "preference"}


@pytest.mark.parametrize(("data", "key", "said"), [
    ({"dataset": {"name_or_path": "d.json"}, "train": {"objective": "dpo"}}, "dataset.format",
     "alpaca rows have no rejected answer; train.objective dpo trains on pairs"),
    ({"dataset": PAIRS}, "dataset.format", "preference pairs train with train.objective: dpo or orpo"),
    ({"dataset": PAIRS, "train": {"objective": "dpo", "method": "full", "preference": {"init_adapter": "a"}}},
     "train.preference.init_adapter", "method full trains the model's own weights, not an adapter"),
    ({"dataset": PAIRS, "train": {"objective": "dpo", "tokens_per_batch": 512}}, "train.tokens_per_batch",
     "dpo batches pairs of padded rows"),
    ({"dataset": PAIRS, "eval_dataset": {"name_or_path": "e.json"}, "train": {"objective": "dpo", "eval_steps": 5}},
     "train.eval_steps", "dpo's held-out loss needs pairs"),
    ({"dataset": PAIRS, "train": {"objective": "dpo", "preference": {"loss_type": "kto"}}},
     "train.preference.loss_type", "Input should be"),
    ({"dataset": {"name_or_path": "d.json"}, "registry": {"metric": "pref_accuracy"}}, "registry.metric",
     "pref_accuracy is scored on preference pairs: it needs train.objective dpo or orpo"),
    ({"dataset": {"name_or_path": "d.json"}, "registry": {"guards": [{"metric": "pref_margin", "min": 0}]}},
     "registry.guards", "pref_margin is scored on preference pairs"),
    ({"dataset": PAIRS, "eval_dataset": {"name_or_path": "e.json"}, "train": {"objective": "dpo"},
      "registry": {"metric": "pref_accuracy"}}, "registry.metric", "eval_dataset.format is alpaca"),
])
def test_preference_tuning_refuses_what_cannot_work(data, key, said):
    found = problems(config_error(data))
    assert said in found[key], found


def test_orpo_takes_the_same_pairs_and_ignores_dpos_loss_type():
    orpo = load_config(data={"dataset": PAIRS, "train": {"objective": "orpo", "preference": {"loss_type": "ipo"}}})
    assert orpo.ignored_settings() == ["train.preference.loss_type applies to objective dpo, not orpo: ignored"]
    found = problems(config_error({"dataset": {"name_or_path": "d.json"}, "train": {"objective": "orpo"}}))
    assert "train.objective orpo trains on pairs" in found["dataset.format"], found


def test_preference_settings_are_ignored_by_sft_and_part_of_the_hash():
    from tuneflow.core.params import config_hash

    sft = load_config(data=with_(train={"preference": {"beta": 0.5}}))
    assert "train.preference applies to objectives dpo and orpo, not sft: ignored" in sft.ignored_settings()
    dpo = load_config(data={"dataset": PAIRS, "train": {"objective": "dpo"}})
    assert dpo.ignored_settings() == [] and dpo.train.preference.loss_type == "sigmoid"
    beta = load_config(data={"dataset": PAIRS, "train": {"objective": "dpo", "preference": {"beta": 0.5}}})
    assert config_hash(beta) != config_hash(dpo)
