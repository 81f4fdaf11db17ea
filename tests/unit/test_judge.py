"""eval.judge: every pair judged in both orders, a verdict counted only when the orders agree, Elo over seeded match
orders; with a judge model loaded here (the tiny one) and with an OpenAI-compatible endpoint (`transformers serve`)."""

import json
import logging
from pathlib import Path

import pytest

from tests.support.servers import openai_server
from tuneflow.core.config import TuneflowConfig
from tuneflow.core.ports import free_port
from tuneflow.modeling.judge import LocalJudge, elo, judge_pairs, parse, summarize
from tuneflow.sources.judge import endpoint, judge_problems

QUESTIONS = ["Add 1 and 2.", "Reverse: a b c", "Title: the cat", "Add 2 and 2."]
REFERENCES = ["3", "c b a", "The cat", "4"]
GOOD = ["3", "c b a", "The cat", "4"]
BAD = ["7", "a b c", "A dog", "4"]  # the last pair: both answers right


def shown(chat: list[dict]) -> tuple[str, str]:
    """The answers a judge prompt shows as A and as B."""
    text = chat[-1]["content"]
    a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
    b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
    return a, b


def fair(chats):  # prefers the answer that matches the reference, wherever it is shown
    out = []
    for chat in chats:
        a, b = shown(chat)
        reference = chat[-1]["content"].split("[Reference Answer]\n")[1].split("\n\n")[0]
        label = "C" if (a == reference) == (b == reference) else ("A" if a == reference else "B")
        out.append({"label": label, "reply": f"verdict: [[{label}]]"})
    return out


def test_a_verdict_counts_only_when_both_orders_agree():
    records = judge_pairs(fair, QUESTIONS, REFERENCES, GOOD, BAD)
    assert [r["outcome"] for r in records] == ["win", "win", "win", "tie"]
    assert [(r["mine_first"], r["theirs_first"]) for r in records] == [("A", "B")] * 3 + [("C", "C")]
    assert summarize(records, 100, 0)["judge.consistency"] == 1.0
    assert [r["outcome"] for r in judge_pairs(fair, QUESTIONS, REFERENCES, BAD, GOOD)] == ["loss"] * 3 + ["tie"]

    first_shown = lambda chats: [{"label": "A", "reply": "[[A]]"} for _ in chats]  # noqa: E731 - position bias only
    biased = judge_pairs(first_shown, QUESTIONS, REFERENCES, GOOD, BAD)
    assert [r["outcome"] for r in biased] == ["tie"] * 4
    metrics = summarize(biased, 100, 0)
    assert metrics["judge.consistency"] == 0 and metrics["judge.tie_rate"] == 1 and metrics["judge.win_rate"] == 0
    assert metrics["judge.elo"] == metrics["judge.opponent_elo"] == 1000


def test_both_orders_are_shown_to_the_judge():
    seen = []
    judge_pairs(lambda chats: seen.extend(shown(c) for c in chats) or fair(chats), QUESTIONS, REFERENCES, GOOD, BAD)
    assert seen == list(zip(GOOD, BAD)) + list(zip(BAD, GOOD))


def test_an_endpoint_reply_without_a_verdict_is_a_tie_and_counted():
    assert parse("A is better. [[B]] no wait, [[A]]") == "A" and parse("A is better") is None
    mute = lambda chats: [{"label": parse("I cannot decide"), "reply": "I cannot decide"} for _ in chats]  # noqa: E731
    metrics = summarize(judge_pairs(mute, QUESTIONS, REFERENCES, GOOD, BAD), 10, 0)
    assert metrics["judge.unparsed"] == 1 and metrics["judge.tie_rate"] == 1 and metrics["judge.consistency"] == 0


def test_elo_averages_seeded_match_orders():
    games = ["win"] * 6 + ["loss"] * 2 + ["tie"] * 2
    ratings = elo(games, rounds=500, seed=3)
    assert ratings == elo(games, rounds=500, seed=3)  # seeded
    assert ratings.mine > 1000 > ratings.theirs and ratings.mine + ratings.theirs == pytest.approx(2000)
    assert elo(["loss"] * 6 + ["win"] * 2, rounds=500, seed=3).mine < 1000
    assert elo(["tie"] * 5).mine == pytest.approx(1000) and elo([]).mine == 1000


def test_a_judge_model_loaded_here_cannot_favour_a_position(tiny_assets):
    """The tiny judge has a strong position bias; identical answers shown in both orders can only tie."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = LocalJudge(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]),
                       AutoTokenizer.from_pretrained(tiny_assets["model"]), batch_size=4)
    same = judge_pairs(judge, QUESTIONS, REFERENCES, GOOD, GOOD)
    assert [r["outcome"] for r in same] == ["tie"] * 4
    assert all(r["mine_first"] in "ABC" and r["theirs_first"] in "ABC" for r in same)
    assert all(r["mine_first_reply"].count(":") == 3 for r in same)  # the three labels' log-likelihoods
    records = judge_pairs(judge, QUESTIONS, REFERENCES, GOOD, BAD)
    metrics = summarize(records, 100, 0)
    assert metrics["judge.consistency"] == sum(r["consistent"] for r in records) / 4
    assert metrics["judge.win_rate"] + metrics["judge.tie_rate"] + metrics["judge.loss_rate"] == pytest.approx(1)


def config(tiny_assets, **judge) -> TuneflowConfig:
    return TuneflowConfig.model_validate({"model": {"name_or_path": str(tiny_assets["model"])},
                                          "dataset": {"name_or_path": str(tiny_assets["data"])},
                                          "eval": {"judge": {"model": str(tiny_assets["model"]), **judge}}})


def test_an_openai_compatible_endpoint_judges_both_orders(tiny_assets, tmp_path, monkeypatch):
    from tuneflow.modeling.judge import EndpointJudge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-judge-key")
    with openai_server(tmp_path / "serve") as url:
        cfg = config(tiny_assets, base_url=url, max_new_tokens=6)
        assert judge_problems(cfg, logging.getLogger("test")) == []
        records = judge_pairs(EndpointJudge(endpoint(cfg), str(tiny_assets["model"]), 6), QUESTIONS[:2],
                              REFERENCES[:2], GOOD[:2], BAD[:2])
    assert len(records) == 2 and all(r["mine_first_reply"] and r["theirs_first_reply"] for r in records)
    for r in records:  # the tiny judge answers in noise: no verdict, so no win for either
        assert r["outcome"] == "tie" or (r["mine_first"] and r["theirs_first"])
        assert "sk-canary-judge-key" not in str(r)


def test_a_judge_that_cannot_be_reached_is_named_before_training(tiny_assets, tmp_path):
    log = logging.getLogger("test")
    down = f"http://127.0.0.1:{free_port()}/v1"
    assert judge_problems(config(tiny_assets, base_url=down), log) == [
        f"eval.judge.base_url: no answer from {down}; is the endpoint up and reachable from here?"]
    missing = tmp_path / "no-judge"
    assert judge_problems(config(tiny_assets, model=str(missing)), log) == [
        f"eval.judge.model: no such file or folder: {missing}"]


def test_a_local_judge_logs_its_verdicts_and_figures_to_the_run(tiny_assets, tmp_path):
    from mlflow import MlflowClient

    from tuneflow.tracking.judging import judge_and_log

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("judge", artifact_location=str(tmp_path / "a"))).info.run_id
    rows = [{"prompt": [{"role": "user", "content": q}], "reference": r} for q, r in zip(QUESTIONS, REFERENCES)]
    cfg = config(tiny_assets, samples=3, elo_rounds=50)
    metrics = judge_and_log(cfg, client, run_id, logging.getLogger("test"), rows, GOOD, BAD)
    assert set(metrics) == {"judge.win_rate", "judge.tie_rate", "judge.loss_rate", "judge.consistency",
                            "judge.unparsed", "judge.elo", "judge.opponent_elo"}
    assert client.get_run(run_id).data.tags["tuneflow.judge"].startswith(f"{tiny_assets['model']}@sha256:")
    table = json.loads(Path(client.download_artifacts(run_id, "judge/verdicts.json", str(tmp_path))).read_text())
    assert [row[table["columns"].index("question")] for row in table["data"]] == QUESTIONS[:3]  # judge.samples


def test_credentials_in_the_endpoints_url_are_refused(tiny_assets):
    from tuneflow.core.loading import ConfigError

    with pytest.raises(ConfigError, match="eval.judge.base_url.*credentials in the URL would be logged"):
        from tuneflow.core.loading import load_config

        load_config(data={"dataset": {"name_or_path": "x"},
                          "eval": {"judge": {"model": "m", "base_url": "http://user:sk-secret@vllm:8000/v1"}}})
    assert config(tiny_assets, base_url="http://vllm:8000/v1").eval.judge.base_url == "http://vllm:8000/v1"
