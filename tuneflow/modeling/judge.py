"""Pairwise judging, as the QLoRA paper rates its models: a judge compares two models' answers to the same held-out
prompt, **in both orders**; a verdict counts only when the two orders agree (else it is a tie, since judges favour the
answer they see first), and Elo ratings are averaged over many seeded random orders of the matches.

The judge is a model loaded here with transformers (its verdict is the most likely of the three verdict labels after
the prompt, scored through lm-evaluation-harness's HF wrapper, batched) or an OpenAI-compatible endpoint the team
serves (vLLM, `transformers serve`, ...; its verdict is parsed from the reply; a reply without one is a tie, counted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below, using the reference answer as a guide. Avoid any position bias: the order in "
    "which the responses are presented must not influence your decision, nor their length. After a short "
    'explanation, output your final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if '
    'assistant B is better, and "[[C]]" for a tie.'
)
QUESTION = (
    "[User Question]\n{question}\n\n[Reference Answer]\n{reference}\n\n"
    "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)
LABELS = ("A", "B", "C")  # A first shown better, B second shown better, C tie
VERDICT = re.compile(r"\[\[([ABC])\]\]")


def messages(question: str, reference: str, a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTION.format(question=question, reference=reference, a=a, b=b)}]


def parse(reply: str) -> str | None:
    """The last verdict label in a judge's reply, or None when it gives none."""
    found = VERDICT.findall(reply)
    return found[-1] if found else None


class LocalJudge:
    """A judge model loaded here: its verdict is the label it finds most likely after the prompt and "[["."""

    def __init__(self, model, tokenizer, batch_size: int):
        from lm_eval.models.huggingface import HFLM

        self.tokenizer = tokenizer
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    def __call__(self, chats: list[list[dict]]) -> list[dict]:
        from lm_eval.api.instance import Instance

        contexts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + "[["
                    for c in chats]
        requests = [Instance("loglikelihood", {}, (ctx, f"{label}]]"), i)
                    for i, ctx in enumerate(contexts) for label in LABELS]
        scores = [logprob for logprob, _ in self.lm.loglikelihood(requests, disable_tqdm=True)]
        out = []
        for i in range(len(chats)):
            mine = scores[i * len(LABELS):(i + 1) * len(LABELS)]
            best = LABELS[int(np.argmax(mine))]
            out.append({"label": best, "reply": " ".join(f"{lab}:{s:.3f}" for lab, s in zip(LABELS, mine))})
        return out


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat completions endpoint, asked greedily, several requests at a time
    (in order); the key never leaves the client."""

    def __init__(self, client, model: str, max_new_tokens: int, concurrency: int = 8):
        self.client, self.model, self.max_new_tokens = client, model, max_new_tokens  # an openai.OpenAI client
        self.concurrency = concurrency  # requests in flight at once

    def __call__(self, chats: list[list[dict]]) -> list[dict]:
        from concurrent.futures import ThreadPoolExecutor

        def ask(chat: list[dict]) -> dict:
            reply = self.client.chat.completions.create(model=self.model, messages=chat, temperature=0,
                                                        max_tokens=self.max_new_tokens)
            text = reply.choices[0].message.content or ""
            return {"label": parse(text), "reply": text}

        with ThreadPoolExecutor(self.concurrency) as pool:  # a serving engine batches requests that arrive together
            return list(pool.map(ask, chats))


def judge_pairs(judge, questions: list[str], references: list[str], mine: list[str], theirs: list[str]) -> list[dict]:
    """Every pair judged twice: ``mine`` shown first, then ``theirs`` shown first. One record per pair: both raw
    verdicts and the outcome for ``mine``: win, loss or tie (a tie too when the two orders disagree)."""
    first = judge([messages(q, r, a, b) for q, r, a, b in zip(questions, references, mine, theirs)])
    second = judge([messages(q, r, b, a) for q, r, a, b in zip(questions, references, mine, theirs)])
    records = []
    for q, a, b, one, two in zip(questions, mine, theirs, first, second):
        # as the winner of the pair: "mine", "theirs", "tie", or None (no verdict)
        said = ({"A": "mine", "B": "theirs", "C": "tie"}.get(one["label"]),
                {"A": "theirs", "B": "mine", "C": "tie"}.get(two["label"]))
        consistent = said[0] is not None and said[0] == said[1]
        outcome = {"mine": "win", "theirs": "loss"}.get(said[0], "tie") if consistent else "tie"
        records.append({"question": q, "mine": a, "theirs": b, "mine_first": one["label"] or "",
                        "theirs_first": two["label"] or "", "mine_first_reply": one["reply"],
                        "theirs_first_reply": two["reply"], "consistent": consistent, "outcome": outcome})
    return records


@dataclass(frozen=True)
class Ratings:
    mine: float
    theirs: float


def elo(outcomes: list[str], rounds: int = 1000, seed: int = 0, k: float = 32.0, start: float = 1000.0) -> Ratings:
    """Elo ratings of the two players after the matches (win, loss or tie for "mine"), averaged over ``rounds``
    seeded random orders of the matches (K=32, from 1000, as the QLoRA paper does)."""
    score = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes])
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(len(score)) for _ in range(rounds)]) if len(score) else np.zeros((rounds, 0))
    mine, theirs = np.full(rounds, start), np.full(rounds, start)
    for step in range(orders.shape[1]):
        s = score[orders[:, step].astype(int)]
        expected = 1.0 / (1.0 + 10 ** ((theirs - mine) / 400.0))
        mine, theirs = mine + k * (s - expected), theirs - k * (s - expected)
    return Ratings(float(mine.mean()), float(theirs.mean()))


def summarize(records: list[dict], rounds: int, seed: int) -> dict[str, float]:
    """judge.win_rate / tie_rate / loss_rate (of "mine"), judge.consistency (both orders agreed), judge.unparsed
    (verdicts without a label), and both players' Elo."""
    n = max(len(records), 1)
    outcomes = [r["outcome"] for r in records]
    ratings = elo(outcomes, rounds, seed)
    verdicts = [r[k] for r in records for k in ("mine_first", "theirs_first")]
    return {
        "judge.win_rate": outcomes.count("win") / n, "judge.tie_rate": outcomes.count("tie") / n,
        "judge.loss_rate": outcomes.count("loss") / n,
        "judge.consistency": sum(r["consistent"] for r in records) / n,
        "judge.unparsed": verdicts.count("") / max(len(verdicts), 1),
        "judge.elo": ratings.mine, "judge.opponent_elo": ratings.theirs,
    }
