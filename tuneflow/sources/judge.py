"""eval.judge before anything runs: a judge model that can be found (a Hub repo at its revision, a local folder), or an
endpoint that answers and accepts its key; and the endpoint's key, which never enters the config."""

from __future__ import annotations

import logging
import os

from tuneflow.core.config import TuneflowConfig
from tuneflow.sources.hub import Problem, hub_token, locate, rekey, secret


def api_key(cfg: TuneflowConfig) -> str | None:
    """The endpoint's key: the Prefect Secret eval.judge.api_key_secret; None leaves it to OPENAI_API_KEY."""
    name = cfg.eval.judge.api_key_secret
    return secret(name, "eval.judge.api_key_secret") if name else None


def endpoint(cfg: TuneflowConfig):
    """An OpenAI client of eval.judge.base_url (a server without keys, such as a plain vLLM, takes any)."""
    from openai import OpenAI

    key = api_key(cfg) or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    return OpenAI(base_url=cfg.eval.judge.base_url, api_key=key, max_retries=3, timeout=600)


def judge_problems(cfg: TuneflowConfig, logger: logging.Logger) -> list[str]:
    """Pre-flight: the judge model is not found, or its endpoint does not answer or refuses the key."""
    j = cfg.eval.judge
    if j is None or (j.model.startswith("models:/") and not j.base_url):
        return []
    try:
        if not j.base_url:
            locate(j.model, j.revision, "model", logger, hub_token(cfg))
            return []
        import openai

        try:
            endpoint(cfg).with_options(max_retries=1, timeout=30).models.list()
        except openai.AuthenticationError:
            return [f"eval.judge.base_url: {j.base_url} refused the key (set OPENAI_API_KEY, or "
                    "eval.judge.api_key_secret to a Prefect Secret holding it)"]
        except openai.APIConnectionError:
            return [f"eval.judge.base_url: no answer from {j.base_url}; is the endpoint up and reachable from here?"]
    except Problem as exc:
        return [rekey(exc, "model", "eval.judge.model", "eval.judge.revision")]
    return []
