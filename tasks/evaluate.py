"""Stage 4, evaluate: held-out loss and perplexity, then greedy answers scored with BLEU-4 and ROUGE-1/2/L, for the base
model and the tuned one, side by side; on preference pairs, pref_accuracy and pref_margin; the benchmarks of
eval.benchmarks for both; and, with eval.judge, the tuned answers judged against the base answers in both orders
(judge.win_rate, judge.elo, ...).

Reads the model (Hub cache by commit), the prepared eval split and the trained weights (MLflow artifacts), and logs
`predictions/predictions.jsonl` (prompt, reference, base and tuned answers), which export reads back to check that
the exported model answers exactly as the adapter did.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.results import PREDICTIONS, DownloadResult, EvalResult, PrepareResult, TrainResult
from tuneflow.sources.hub import fetch
from tuneflow.tracking.artifacts import materialize, publish
from tuneflow.tracking.context import RunContext
from tuneflow.tracking.judging import judge_and_log
from tuneflow.tracking.run_record import prepare_benchmarks
from tuneflow.tracking.runs import log_metrics


def pair_metrics(tuned, reference, tokenizer, chosen: list[dict], prompts: list[list[dict]], rejected: list[str],
                 cfg: TuneflowConfig) -> tuple[dict, dict]:
    """pref_accuracy and pref_margin (`tuneflow.modeling.metrics.preference`) of the tuned model, and of the
    reference itself (the base: 0 and 0), on held-out pairs: ``chosen`` encoded, ``rejected`` the other answers.
    ``reference``: the base model, or None for the tuned adapter switched off."""
    from tuneflow.data.tokenize import encode_batch
    from tuneflow.modeling.generation import answer_logps
    from tuneflow.modeling.metrics import preference

    enc = encode_batch(tokenizer, [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, rejected)],
                       cfg.prep.cutoff_len)
    worse = [{"input_ids": i, "labels": lab} for i, lab in zip(enc["input_ids"], enc["labels"])]
    size, beta = cfg.eval.batch_size, cfg.train.preference.beta
    policy = answer_logps(tuned, tokenizer, chosen, size), answer_logps(tuned, tokenizer, worse, size)
    with tuned.disable_adapter() if reference is None else contextlib.nullcontext():
        model = tuned if reference is None else reference
        base = answer_logps(model, tokenizer, chosen, size), answer_logps(model, tokenizer, worse, size)
    return preference(*policy, *base, beta), preference(*base, *base, beta)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    cfg: TuneflowConfig, downloaded: DownloadResult, prepared: PrepareResult, trained: TrainResult, ctx: RunContext
) -> EvalResult:
    from datasets import load_from_disk

    from tuneflow.modeling.benchmarks import score
    from tuneflow.modeling.load import device, load_base, load_tokenizer, load_trained
    from tuneflow.modeling.metrics import measure

    logger = get_run_logger()
    with ctx.stage("evaluate") as (client, run_id):
        model_dir = fetch(downloaded.model, cfg, logger)
        weights_dir = materialize(trained.weights, ctx.tracking_uri)
        split = load_from_disk(str(materialize(prepared.data, ctx.tracking_uri)))["eval"]
        rows = split.select(range(min(cfg.eval.max_samples, len(split))))
        examples = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
        prompts = [json.loads(p) for p in rows["prompt"]]
        references = list(rows["reference"])
        tokenizer = load_tokenizer(model_dir, cfg)
        device_map = {"": device()}
        benchmarks = prepare_benchmarks(cfg, Path(ctx.run_dir) / "evaluate" / "benchmarks", client, run_id, logger)

        base, base_metrics, base_answers, base_samples = None, {}, [""] * len(prompts), {}
        if cfg.eval.compare_base:
            base = load_base(model_dir, cfg, quantized=True, device_map=device_map)
            base_metrics, base_answers = measure(base, tokenizer, examples, prompts, references, cfg)
            if benchmarks:
                scores, base_samples = score(base, tokenizer, benchmarks.benchmarks, benchmarks.task_dir,
                                             cfg.eval.batch_size)
                base_metrics.update(scores)
            logger.info("evaluate: base %s", json.dumps(base_metrics))
            log_metrics(client, run_id, {f"base.{k}": v for k, v in base_metrics.items()})
        tuned = load_trained(model_dir, weights_dir, cfg, device_map=device_map, base=base)
        metrics, answers = measure(tuned, tokenizer, examples, prompts, references, cfg)
        # preference pairs, after preference tuning: DPO's implicit reward against the base (an adapter switched off)
        rejected = list(rows["rejected"]) if "rejected" in rows.column_names and cfg.train.objective != "sft" else None
        if rejected is not None:
            reference = None
            if cfg.train.method in ("full", "freeze"):
                reference = base or load_base(model_dir, cfg, quantized=True, device_map=device_map)
            tuned_pairs, base_pairs = pair_metrics(tuned, reference, tokenizer, examples, prompts, rejected, cfg)
            del reference
            metrics.update(tuned_pairs)
            if cfg.eval.compare_base:
                base_metrics.update(base_pairs)
                log_metrics(client, run_id, {f"base.{k}": v for k, v in base_pairs.items()})
        if benchmarks:
            scores, samples = score(tuned, tokenizer, benchmarks.benchmarks, benchmarks.task_dir, cfg.eval.batch_size)
            metrics.update(scores)
            for key, logged in samples.items():  # the per-question log, base and tuned side by side
                table = {"task": [s["task"] for s in logged], "question": [s["question"] for s in logged],
                         "target": [s["target"] for s in logged], "tuned_acc": [s.get("acc") for s in logged]}
                if key in base_samples:
                    table["base_acc"] = [s.get("acc") for s in base_samples[key]]
                client.log_table(run_id, data=table, artifact_file=f"benchmarks/{key}.json")
        if cfg.eval.judge and cfg.eval.compare_base:  # the judge loads once both models are gone
            del tuned, base
            gc.collect()
            rows = [{"prompt": p, "reference": r} for p, r in zip(prompts, references)]
            metrics.update(judge_and_log(cfg, client, run_id, logger, rows, answers, base_answers, device_map))
        logger.info("evaluate: tuned %s", json.dumps(metrics))
        log_metrics(client, run_id, metrics)

        folder = Path(ctx.run_dir) / "evaluate" / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / PREDICTIONS, "w", encoding="utf-8") as fh:
            for i, (p, r, b, a) in enumerate(zip(prompts, references, base_answers, answers)):
                pair = {"rejected": rejected[i]} if rejected is not None else {}
                fh.write(json.dumps({"prompt": p, "reference": r, **pair, "base": b, "tuned": a},
                                    ensure_ascii=False) + "\n")
        predictions = publish(client, run_id, folder, "predictions")
        client.log_table(run_id, data={
            "prompt": [p[-1]["content"] for p in prompts], "reference": references,
            "base": base_answers, "tuned": answers,
        }, artifact_file="predictions.json")
        return EvalResult(metrics=metrics, base_metrics=base_metrics, predictions=predictions, mlflow_run_id=run_id)

