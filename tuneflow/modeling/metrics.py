"""BLEU-4 and ROUGE-1/2/L on generated answers, with sacrebleu and rouge-score; preference accuracy on held-out
pairs.

Both score pre-segmented text: Chinese (any CJK character) is segmented into words with jieba, as the BLEU/ROUGE
figures of the Chinese title-generation experiments are; other text is split on whitespace and punctuation.
Scores are on a 0-100 scale.
"""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def segment(text: str) -> list[str]:
    if _CJK.search(text):
        import jieba

        jieba.setLogLevel(60)
        return [tok for tok in jieba.lcut(text.lower()) if tok.strip()]
    return _WORD.findall(text.lower())


class _Segmenter:
    """The tokenizer interface rouge-score expects (its default drops every non-ASCII character)."""

    def tokenize(self, text: str) -> list[str]:
        return segment(text)


def bleu4(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    hyps = [" ".join(segment(p)) for p in predictions]
    refs = [" ".join(segment(r)) for r in references]
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="exp").score


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the examples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Segmenter())
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        totals["rouge-1"] += scores["rouge1"].fmeasure
        totals["rouge-2"] += scores["rouge2"].fmeasure
        totals["rouge-l"] += scores["rougeL"].fmeasure
    n = max(1, len(predictions))
    return {k: 100 * v / n for k, v in totals.items()}


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"bleu-4": bleu4(predictions, references), **rouge(predictions, references)}


def measure(model, tokenizer, rows, prompts, references, cfg) -> tuple[dict, list[str]]:
    """Held-out loss and perplexity over ``rows``, then greedy answers to ``prompts`` scored against ``references``
    (with the generation settings of ``cfg.eval``); returns (metrics, answers)."""
    import time

    from tuneflow.modeling.generation import eval_loss, generate

    metrics = eval_loss(model, tokenizer, rows, cfg.eval.batch_size)
    start = time.perf_counter()
    answers = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    runtime = time.perf_counter() - start
    metrics.update(score(answers, references))
    metrics.update({"predict_runtime": runtime, "predict_samples_per_second": len(prompts) / runtime})
    return metrics, answers


def preference(chosen: list[float], rejected: list[float], ref_chosen: list[float], ref_rejected: list[float],
               beta: float) -> dict[str, float]:
    """DPO's implicit reward of each answer, beta * (log p(answer) - log p_ref(answer)), on held-out pairs:
    pref_accuracy, the share of pairs whose chosen answer gets the higher reward (a tie is no win, as in TRL's
    rewards/accuracies: the reference against itself scores 0), and pref_margin, the mean reward difference."""
    margins = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected,
                                                                     strict=True)]
    n = max(1, len(margins))
    return {"pref_accuracy": sum(m > 0 for m in margins) / n, "pref_margin": sum(margins) / n}
