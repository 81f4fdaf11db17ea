"""Preference tuning in the training worker (train.objective: dpo): TRL's DPOTrainer over the prepared pairs.

The prepare stage writes a preference row as the prompt, the chosen answer (``reference``) and the ``rejected`` one;
TRL tokenizes them with the model's chat template. The reference model is the base with the adapter switched off: TRL
keeps a frozen copy of the initial adapter (``ref``) beside the trained one, which the worker leaves out of the
adapter it publishes (``drop_reference_adapter``). Per-step metrics keep TRL's names (``rewards/chosen``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ...).
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


def dpo_arguments(cfg) -> dict:
    """DPOConfig's settings beyond TrainingArguments'."""
    p = cfg.train.preference
    return {"beta": p.beta, "loss_type": [p.loss_type], "max_length": cfg.prep.cutoff_len,
            "precompute_ref_log_probs": False}


def dpo_trainer(model, args, train_dataset, eval_dataset, tokenizer, callbacks, loraplus_lr_ratio: float | None):
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tuneflow.training.batching import CountingCollator
    from tuneflow.training.trainer import LoraPlus

    class TuneflowDPOTrainer(LoraPlus, DPOTrainer):
        pass

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = CountingCollator(DataCollatorForPreference(pad_token_id=pad, max_length=args.max_length))
    trainer = TuneflowDPOTrainer(model=model, args=args, train_dataset=pairs(train_dataset),
                                 eval_dataset=pairs(eval_dataset) if eval_dataset is not None else None,
                                 data_collator=batches, processing_class=tokenizer, callbacks=callbacks)
    trainer.loraplus_lr_ratio = loraplus_lr_ratio
    return trainer, batches


def drop_reference_adapter(folder: Path) -> None:
    """A saved model holds TRL's frozen reference adapter beside the trained one; the published adapter is the
    trained one only."""
    shutil.rmtree(folder / REFERENCE_ADAPTER, ignore_errors=True)
