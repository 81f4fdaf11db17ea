"""Preference tuning in the training worker (train.objective: dpo, orpo): TRL's DPOTrainer or ORPOTrainer over the
prepared pairs.

The prepare stage writes a preference row as the prompt, the chosen answer (``reference``) and the ``rejected`` one;
TRL tokenizes them with the model's chat template. DPO's reference model is the starting point: TRL keeps a frozen
copy of the initial adapter (``ref``: a new adapter, i.e. the base itself, or train.preference.init_adapter) beside
the trained one, which the worker leaves out of the adapter it publishes (``drop_reference_adapter``); ORPO needs
none. Per-step metrics keep TRL's names (``rewards/chosen``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ORPO's ``log_odds_ratio``, ...).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REFERENCE_ADAPTER = "ref"  # the adapter name TRL gives the frozen copy


def pairs(split):
    """TRL's conversational preference rows (prompt messages, chosen and rejected answers) of a prepared split."""
    def pair(row: dict) -> dict:
        return {"prompt": json.loads(row["prompt"]), "chosen": [{"role": "assistant", "content": row["reference"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}

    return split.map(pair, remove_columns=split.column_names)


def arguments(cfg) -> tuple[type, dict]:
    """TRL's config class for train.objective and its settings beyond TrainingArguments'."""
    p = cfg.train.preference
    if cfg.train.objective == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig, {"beta": p.beta, "max_length": cfg.prep.cutoff_len}
    from trl import DPOConfig

    return DPOConfig, {"beta": p.beta, "loss_type": [p.loss_type], "max_length": cfg.prep.cutoff_len,
                       "precompute_ref_log_probs": False}


def preference_trainer(cfg, model, args, train_dataset, eval_dataset, tokenizer, callbacks,
                       loraplus_lr_ratio: float | None):
    """TRL's trainer for train.objective over the prepared pairs, with LoRA+ when set, and its collator counting
    the tokens it pads (for tokens/s and the padding fraction)."""
    import datasets

    from tuneflow.training.batching import CountingCollator
    from tuneflow.training.trainer import LoraPlus

    # The prepared data is a verified cache entry (by content digest): maps must not write cache files beside it.
    datasets.disable_caching()
    if cfg.train.objective == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Base
    else:
        from trl import DPOTrainer as Base

    class PreferenceTrainer(LoraPlus, Base):
        pass

    trainer = PreferenceTrainer(model=model, args=args, train_dataset=pairs(train_dataset),
                                eval_dataset=pairs(eval_dataset) if eval_dataset is not None else None,
                                processing_class=tokenizer, callbacks=callbacks)
    trainer.loraplus_lr_ratio = loraplus_lr_ratio
    trainer.data_collator = batches = CountingCollator(trainer.data_collator)  # TRL's own: pairs padded
    return trainer, batches


def drop_reference_adapter(folder: Path) -> None:
    """A saved model holds TRL's frozen reference adapter beside the trained one; the published adapter is the
    trained one only."""
    shutil.rmtree(folder / REFERENCE_ADAPTER, ignore_errors=True)
