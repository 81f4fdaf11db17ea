"""eval.judge: the judge opened (a model from the Hub by commit, a local folder or a models:/ URI, loaded here; or an
OpenAI-compatible endpoint), the pairs judged in both orders, and the verdicts logged to the MLflow run: `judge.*`
metrics, the raw verdicts as the table `judge/verdicts.json`, the judge's identity as the tag `tuneflow.judge`."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneflow.core.config import ModelConfig, TuneflowConfig


def judge_config(cfg: TuneflowConfig) -> TuneflowConfig:
    """cfg with the judge as its model: loaded as any model is (safetensors, no remote code, its own template)."""
    j = cfg.eval.judge
    return cfg.model_copy(update={"model": ModelConfig(name_or_path=j.model, revision=j.revision)})


def judge_folder(cfg: TuneflowConfig, tracking_uri: str, logger: logging.Logger) -> tuple[Path, str]:
    """The judge model's folder on this machine, and what it is (name@commit, or the models:/ URI)."""
    from tuneflow.sources.hub import hub_token, locate, model_patterns, pinned, snapshot
    from tuneflow.sources.registered import registered_folder

    j = cfg.eval.judge
    if j.model.startswith("models:/"):
        return registered_folder(j.model, tracking_uri), j.model
    src = locate(j.model, j.revision, "model", logger, hub_token(cfg))
    folder = snapshot(src, model_patterns(judge_config(cfg)), logger)
    ref = pinned(src, folder)
    return folder, f"{ref.name}@{ref.revision}"


def open_judge(cfg: TuneflowConfig, tracking_uri: str, logger: logging.Logger, device_map=None):
    """(the judge, what it is): a callable from chats to verdicts (`tuneflow.modeling.judge`)."""
    from tuneflow.modeling.judge import EndpointJudge, LocalJudge

    j = cfg.eval.judge
    if j.base_url:
        from tuneflow.sources.judge import endpoint

        return (EndpointJudge(endpoint(cfg), j.model, j.max_new_tokens, cfg.eval.batch_size),
                f"{j.model} at {j.base_url}")
    from tuneflow.modeling.load import load_pretrained, load_tokenizer
    from tuneflow.modeling.precision import compute_dtype
    from tuneflow.sources.hub import Problem

    folder, what = judge_folder(cfg, tracking_uri, logger)
    as_model = judge_config(cfg)
    try:
        tokenizer = load_tokenizer(folder, as_model)
    except ValueError:
        raise Problem(f"eval.judge.model: {j.model} has no chat template; judge with an instruction-tuned model") \
            from None
    return LocalJudge(load_pretrained(folder, as_model, compute_dtype(cfg), device_map), tokenizer,
                      cfg.eval.batch_size), what


def judge_and_log(cfg: TuneflowConfig, client, run_id: str, logger: logging.Logger, rows: list[dict],
                  mine: list[str], theirs: list[str], device_map=None) -> dict[str, float]:
    """Judge ``mine`` against ``theirs`` (answers to ``rows``: prompt messages and reference) in both orders; log
    the judge.* metrics, the verdicts table and the judge's identity on the run; return the metrics."""
    from tuneflow.modeling.judge import judge_pairs, summarize

    j = cfg.eval.judge
    n = min(len(rows), j.samples or len(rows))
    judge, what = open_judge(cfg, client.tracking_uri, logger, device_map)
    logger.info("judge %s: %d pairs, each in both orders", what, n)
    questions = [next((m["content"] for m in reversed(r["prompt"]) if m["role"] == "user"), "") for r in rows[:n]]
    records = judge_pairs(judge, questions, [r["reference"] for r in rows[:n]], mine[:n], theirs[:n])
    metrics = summarize(records, j.elo_rounds, cfg.train.seed)
    client.set_tag(run_id, "tuneflow.judge", what)
    if records:
        client.log_table(run_id, data={k: [r[k] for r in records] for k in records[0]},
                         artifact_file="judge/verdicts.json")
    logger.info("judge: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics
