"""Datasets in the formats users bring -> chat messages -> train / eval splits (the token ids and labels:
test_chat_template.py)."""

import json
from pathlib import Path

import pytest

from tests.support.chat import assistant, system, user
from tuneflow.data.formats import DatasetError, load_conversations, split_indices


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Parquet/CSV go through `datasets`, which caches Arrow files: keep them out of the home folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf-datasets-cache"))


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def load_rows(tmp_path: Path, fmt: str, rows: list) -> list[list[dict]]:
    return load_conversations(write_json(tmp_path / "rows.json", rows), fmt)




# --- formats -> messages -----------------------------------------------------------------------------------


def test_alpaca_with_input(tmp_path):
    rows = [{"instruction": "Summarize the text.", "input": "The cat sat on the mat all day.", "output": "Cat sat."}]
    assert load_rows(tmp_path, "alpaca", rows) == [
        [user("Summarize the text.\nThe cat sat on the mat all day."), assistant("Cat sat.")]
    ]


def test_alpaca_without_input(tmp_path):
    rows = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Add 1 and 1.", "output": "2"},
        {"instruction": "Add 0 and 0.", "input": None, "output": "0"},
    ]
    assert load_rows(tmp_path, "alpaca", rows) == [
        [user("Add 2 and 3."), assistant("5")],
        [user("Add 1 and 1."), assistant("2")],
        [user("Add 0 and 0."), assistant("0")],
    ]


def test_alpaca_with_system_and_history(tmp_path):
    rows = [
        {
            "system": "Answer in one word.",
            "history": [["Hi", "Hello"], ["Colour of the sky?", "Blue"]],
            "instruction": "Colour of grass?",
            "input": "",
            "output": "Green",
        }
    ]
    assert load_rows(tmp_path, "alpaca", rows) == [
        [
            system("Answer in one word."),
            user("Hi"),
            assistant("Hello"),
            user("Colour of the sky?"),
            assistant("Blue"),
            user("Colour of grass?"),
            assistant("Green"),
        ]
    ]


def test_sharegpt_roles(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
            ]
        },
        {"system": "You can call tools.", "conversations": [{"from": "user", "value": "x"}, {"from": "assistant",
                                                                                             "value": "y"}]},
    ]
    assert load_rows(tmp_path, "sharegpt", rows) == [
        [user("Hi"), assistant("Hello")],
        [system("Be brief."), user("2+2?"), assistant("4")],
        [system("You can call tools."), user("x"), assistant("y")],
    ]


def test_sharegpt_tool_turns(tmp_path):
    call = '{"name": "weather", "arguments": {"city": "Paris"}}'
    result = '{"temperature": 21}'
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": call},
                {"from": "observation", "value": result},
                {"from": "gpt", "value": "It is 21 degrees."},
            ],
            "tools": "[]",
        }
    ]
    # The call is the assistant's turn, the result is the tool's.
    assert load_rows(tmp_path, "sharegpt", rows) == [
        [
            user("Weather in Paris?"),
            assistant(call),
            {"role": "tool", "content": result},
            assistant("It is 21 degrees."),
        ]
    ]


def test_messages_format(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1", "name": "bot"},  # extra keys are dropped
                {"role": "tool", "content": "T"},
                {"role": "assistant", "content": "A2"},
            ]
        }
    ]
    assert load_rows(tmp_path, "messages", rows) == [
        [system("S"), user("Q1"), assistant("A1"), {"role": "tool", "content": "T"}, assistant("A2")]
    ]


def test_json_with_one_list_under_a_key(tmp_path):
    path = write_json(tmp_path / "d.json", {"train": [{"instruction": "a", "output": "b"}]})
    assert load_conversations(path, "alpaca") == [[user("a"), assistant("b")]]


# --- bad rows: file, row and field ------------------------------------------------------------------------

GOOD = {
    "alpaca": {"instruction": "Say hi.", "output": "hi"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    "messages": {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
}
BAD_ROWS = {
    "alpaca-missing-output": ("alpaca", {"instruction": "Say hi."}, "'output'"),
    "alpaca-non-string-instruction": ("alpaca", {"instruction": 3, "output": "x"}, "'instruction'"),
    "alpaca-list-instruction": ("alpaca", {"instruction": ["a"], "output": "x"}, "'instruction'"),
    "alpaca-empty-instruction": ("alpaca", {"instruction": " ", "output": "x"}, "'instruction'"),
    "alpaca-empty-answer": ("alpaca", {"instruction": "Say hi.", "output": "  "}, "'output'"),
    "alpaca-bad-history": ("alpaca", {"instruction": "a", "output": "b", "history": [["only one"]]}, "'history[0]'"),
    "sharegpt-unknown-role": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        "'conversations[1].from'",
    ),
    "sharegpt-empty-conversations": ("sharegpt", {"conversations": []}, "'conversations'"),
    "sharegpt-missing-conversations": ("sharegpt", {"instruction": "a", "output": "b"}, "'conversations'"),
    "sharegpt-missing-value": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]},
        "'value'",
    ),
    "sharegpt-not-ending-with-assistant": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human",
                                                                                            "value": "c"}]},
        "'conversations",
    ),
    "sharegpt-empty-answer": (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
        "'conversations",
    ),
    "messages-unknown-role": ("messages", {"messages": [{"role": "bot", "content": "a"}]}, "'messages[0].role'"),
    "messages-not-ending-with-assistant": (
        "messages",
        {"messages": [{"role": "user", "content": "a"}]},
        "'messages",
    ),
    "row-not-an-object": ("alpaca", ["Say hi.", "hi"], "object"),
}


@pytest.mark.parametrize(("fmt", "bad", "field"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_names_file_row_and_field(tmp_path, fmt, bad, field):
    path = write_json(tmp_path / "rows.json", [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]])
    with pytest.raises(DatasetError) as info:
        load_conversations(path, fmt)
    headline, *rows = str(info.value).splitlines()
    assert headline == f"1 invalid row for dataset.format={fmt}; fix them, or set prep.on_invalid: drop to skip them:"
    prefix = f"  - {path}: row 3: "
    assert len(rows) == 1 and rows[0].startswith(prefix), rows
    assert field in rows[0][len(prefix):], f"{rows[0]!r} does not name the field {field}"


def test_every_bad_row_is_reported_at_once(tmp_path):
    rows = [GOOD["alpaca"]] * 3 + [{"instruction": f"q{i}"} for i in range(12)] + [{"output": "a"}]
    path = write_json(tmp_path / "rows.json", rows)
    with pytest.raises(DatasetError) as info:
        load_conversations(path, "alpaca")
    headline, *listed = str(info.value).splitlines()
    assert headline.startswith("13 invalid rows for dataset.format=alpaca")
    assert listed[:2] == [f"  - {path}: row 4: field 'output' is missing",
                          f"  - {path}: row 5: field 'output' is missing"]
    assert len(listed) == 11 and listed[-1] == "  - ... and 3 more"


def test_bad_row_in_jsonl_is_numbered_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD["alpaca"]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"rows\.jsonl: row 3: field 'output' is missing"):
        load_conversations(path, "alpaca")


def test_bad_json_in_jsonl_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD["alpaca"]) + "\n" + json.dumps(GOOD["alpaca"]) + "\n{instruction: oops}\n")
    with pytest.raises(DatasetError) as info:
        load_conversations(path, "alpaca")
    assert str(info.value).startswith(f"{path}: line 3: not valid JSON")


def test_bad_json_in_json_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]')
    with pytest.raises(DatasetError) as info:
        load_conversations(path, "alpaca")
    assert str(info.value).startswith(f"{path}: line 3: not valid JSON")


@pytest.mark.parametrize("content", [{"instruction": "a", "output": "b"}, "just text", 42])
def test_json_that_is_not_a_list_names_the_file(tmp_path, content):
    path = write_json(tmp_path / "rows.json", content)
    with pytest.raises(DatasetError) as info:
        load_conversations(path, "alpaca")
    assert str(info.value) == f"{path}: expected a JSON list of rows"


def test_empty_dataset_is_rejected(tmp_path):
    path = write_json(tmp_path / "rows.json", [])
    with pytest.raises(DatasetError, match="no rows"):
        load_conversations(path, "alpaca")


def test_folder_without_data_files_is_rejected(tmp_path):
    (tmp_path / "README.md").write_text("# nothing here")
    with pytest.raises(DatasetError) as info:
        load_conversations(tmp_path, "alpaca")
    assert str(tmp_path) in str(info.value)


# --- file types and folders --------------------------------------------------------------------------------

ALPACA = [
    {"instruction": "Add 1 and 2.", "input": "", "output": "1 plus 2 is 3."},
    {"instruction": "Title this.", "input": "Rain fell, then sun.", "output": "Rain, then sun"},
]
ALPACA_MESSAGES = [
    [user("Add 1 and 2."), assistant("1 plus 2 is 3.")],
    [user("Title this.\nRain fell, then sun."), assistant("Rain, then sun")],
]


def test_reads_json(tmp_path):
    assert load_conversations(write_json(tmp_path / "d.json", ALPACA), "alpaca") == ALPACA_MESSAGES


def test_reads_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    assert load_conversations(path, "alpaca") == ALPACA_MESSAGES


def test_reads_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.parquet"
    pd.DataFrame(ALPACA).to_parquet(path)
    assert load_conversations(path, "alpaca") == ALPACA_MESSAGES


def test_reads_nested_sharegpt_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path)
    assert load_conversations(path, "sharegpt") == [[user("Hi"), assistant("Hello")]]


def test_reads_csv(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.csv"
    pd.DataFrame(ALPACA).to_csv(path, index=False)
    assert load_conversations(path, "alpaca") == ALPACA_MESSAGES


@pytest.mark.parametrize(
    ("csv", "expected"),
    [
        # Every answer looks like a number: it must still be the text of the answer.
        ("instruction,input,output\nAdd 1 and 2.,,3\nAdd 2 and 2.,,4\n", [("Add 1 and 2.", "3"), ("Add 2 and 2.",
                                                                                                  "4")]),
        # Answers that a CSV reader might take for a missing value.
        ("instruction,input,output\nWhich of 4 and 6 is prime?,,None\nSay NA.,,NA\n",
         [("Which of 4 and 6 is prime?", "None"), ("Say NA.", "NA")]),
    ],
    ids=["numeric-answers", "na-like-answers"],
)
def test_csv_cells_are_read_as_text(tmp_path, csv, expected):
    path = tmp_path / "d.csv"
    path.write_text(csv)
    assert load_conversations(path, "alpaca") == [[user(q), assistant(a)] for q, a in expected]


def test_reads_a_folder_of_files_in_path_order(tmp_path):
    pd = pytest.importorskip("pandas")
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_json(folder / "a.json", [{"instruction": "q1", "output": "a1"}])
    (folder / "b.jsonl").write_text(json.dumps({"instruction": "q2", "output": "a2"}) + "\n")
    pd.DataFrame([{"instruction": "q3", "input": "", "output": "a3"}]).to_csv(folder / "c.csv", index=False)
    pd.DataFrame([{"instruction": "q4", "input": "", "output": "a4"}]).to_parquet(folder / "sub" / "d.parquet")
    (folder / "README.md").write_text("not data")
    (folder / "notes.txt").write_text("not data")
    assert load_conversations(folder, "alpaca") == [[user(f"q{i}"), assistant(f"a{i}")] for i in range(1, 5)]


def test_error_in_a_folder_names_the_file(tmp_path):
    write_json(tmp_path / "a.json", [{"instruction": "q1", "output": "a1"}])
    bad = write_json(tmp_path / "b.json", [{"instruction": "q2", "output": "a2"}, {"instruction": "q3"}])
    with pytest.raises(DatasetError) as info:
        load_conversations(tmp_path, "alpaca")
    assert f"  - {bad}: row 2: field 'output' is missing" in str(info.value).splitlines()


# --- train / eval split ------------------------------------------------------------------------------------


def test_split_is_deterministic_for_a_seed():
    assert split_indices(100, 0.1, seed=7) == split_indices(100, 0.1, seed=7)
    assert split_indices(100, 0.1, seed=7) != split_indices(100, 0.1, seed=8)


@pytest.mark.parametrize(("n", "eval_size", "n_eval"), [(100, 0.1, 10), (100, 0.05, 5), (10, 0.01, 1), (37, 0.5, 18)])
def test_split_fraction(n, eval_size, n_eval):
    train, evaluation = split_indices(n, eval_size, seed=42)
    assert len(evaluation) == n_eval
    assert set(train).isdisjoint(evaluation)
    assert sorted(train + evaluation) == list(range(n))
    assert train == sorted(train) and evaluation == sorted(evaluation)


@pytest.mark.parametrize(("n", "eval_size"), [(100, 1), (100, 24), (100, 24.0), (25, 24)])
def test_split_count(n, eval_size):
    train, evaluation = split_indices(n, eval_size, seed=0)
    assert len(evaluation) == int(eval_size)
    assert len(train) == n - int(eval_size)
    assert sorted(train + evaluation) == list(range(n))


@pytest.mark.parametrize(("n", "eval_size"), [(24, 24), (10, 50), (10, 0.99), (1, 0.05)])
def test_split_leaving_no_training_rows_is_rejected(n, eval_size):
    with pytest.raises(ValueError, match=r"dataset\.eval_size"):
        split_indices(n, eval_size, seed=0)


def test_columns_map_the_formats_fields_onto_the_files_own(tmp_path):
    import pandas as pd

    path = tmp_path / "qa.csv"
    pd.DataFrame([{"question": "Add 1 and 2.", "context": "", "answer": "3"},
                  {"question": "Reverse:", "context": "a b", "answer": "b a"}]).to_csv(path, index=False)
    columns = {"instruction": "question", "input": "context", "output": "answer"}
    assert load_conversations(path, "alpaca", columns=columns) == [
        [user("Add 1 and 2."), assistant("3")], [user("Reverse:\na b"), assistant("b a")]]
    dialogs = write_json(tmp_path / "d.json", [{"dialog": [{"from": "human", "value": "hi"},
                                                           {"from": "gpt", "value": "hello"}]}])
    assert load_conversations(dialogs, "sharegpt", columns={"conversations": "dialog"}) == [
        [user("hi"), assistant("hello")]]


def test_a_mapped_column_the_file_lacks_is_named_once(tmp_path):
    path = write_json(tmp_path / "rows.json", [{"question": "q", "reply": "a"}] * 5)
    with pytest.raises(DatasetError) as info:
        load_conversations(path, "alpaca", columns={"instruction": "question", "output": "answer"})
    assert str(info.value) == (f"{path}: dataset.columns reads output from column 'answer', which the file lacks "
                               "(its columns: question, reply)")


def test_columns_name_the_formats_own_fields():
    from tuneflow.core.loading import ConfigError, load_config

    with pytest.raises(ConfigError, match="columns: prompt is no field of format alpaca; its fields are instruction, "
                                          "input, output, system, history"):
        load_config(data={"dataset": {"name_or_path": "x", "columns": {"prompt": "question"}}})


# --- preference pairs ---------------------------------------------------------------------------------------------


def chosen_over(answer: str, rejected: str) -> dict:
    return {**assistant(answer), "rejected": rejected}


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, [user("Hi"), chosen_over("Hello", "Go away")]),
    ({"prompt": [system("Be kind."), user("Hi")], "chosen": [assistant("Hello")], "rejected": [assistant("No")]},
     [system("Be kind."), user("Hi"), chosen_over("Hello", "No")]),
    ({"messages": [user("Hi")], "chosen": "Hello", "rejected": "No"}, [user("Hi"), chosen_over("Hello", "No")]),
    # TRL's implicit prompt: whole conversations that share it
    ({"chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hi"), assistant("No")]},
     [user("Hi"), chosen_over("Hello", "No")]),
    # UltraFeedback (TRL's binarized copy): a prompt, and each answer as the whole conversation
    ({"prompt": "Hi", "chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hi"), assistant("No")]},
     [user("Hi"), chosen_over("Hello", "No")]),
    # LLaMA-Factory's alpaca and sharegpt preference layouts
    ({"instruction": "Add", "input": "1 2", "chosen": "3", "rejected": "4"}, [user("Add\n1 2"), chosen_over("3", "4")]),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
      "rejected": {"from": "gpt", "value": "No"}}, [user("Hi"), chosen_over("Hello", "No")]),
], ids=["trl-text", "trl-messages", "messages", "trl-implicit", "ultrafeedback", "llamafactory-alpaca",
        "llamafactory-sharegpt"])
def test_preference_layouts(tmp_path, row, expected):
    assert load_rows(tmp_path, "preference", [row]) == [expected]


@pytest.mark.parametrize(("row", "said"), [
    ({"prompt": "Hi", "chosen": "Same", "rejected": " Same"}, "fields 'chosen' and 'rejected' are the same answer"),
    ({"prompt": "Hi", "chosen": "Hello"}, "field 'rejected' is missing"),
    ({"prompt": "Hi", "chosen": [assistant("x"), user("y")], "rejected": "No"}, "field 'chosen' must be the answer"),
    ({"question": "Hi", "chosen": "a", "rejected": "b"}, "no prompt: expected field 'prompt' or 'messages'"),
])
def test_bad_preference_rows_are_named(tmp_path, row, said):
    with pytest.raises(DatasetError, match="1 invalid row for dataset.format=preference") as info:
        load_rows(tmp_path, "preference", [row])
    assert f"row 1: {said}" in str(info.value)


def test_a_split_is_read_from_the_files_named_after_it_exactly(tmp_path):
    """split: train reads train.jsonl and data/train-00000.parquet-style names, not train_prefs or train_sft."""
    from tuneflow.data.formats import split_files

    for name in ("train.jsonl", "data/train-00000-of-00001.jsonl", "data/train_prefs-00000.jsonl", "test.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    assert [f.relative_to(tmp_path).as_posix() for f in split_files(tmp_path, "train")] == [
        "data/train-00000-of-00001.jsonl", "train.jsonl"]
    assert [f.name for f in split_files(tmp_path, "train_prefs")] == ["train_prefs-00000.jsonl"]
