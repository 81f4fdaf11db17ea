"""The HF Trainer with tuneflow's additions: token-budget micro-batches, the chunked loss, and LoRA+ (``LoraPlus``,
also mixed into TRL's DPOTrainer by ``tuneflow.training.preference``).

- ``token_batches`` (a ``TokenBudgetBatches``, train.tokens_per_batch): the training DataLoader takes its
  micro-batches from it instead of ``per_device_batch_size`` rows; ``accelerator.prepare`` deals them out to the
  ranks round-robin, as it does any batch sampler.
- ``loss_chunk_tokens`` > 0 (train.loss_chunk_tokens): ``tuneflow.training.loss.chunked_causal_lm_loss`` instead of
  the model's full-logits loss, normalised exactly as the Trainer normalises a model's own loss (by the labelled
  tokens of the accumulated step, across ranks), so the two give the same loss and gradients.
"""

from __future__ import annotations

from transformers import Trainer

from tuneflow.training.loss import chunked_causal_lm_loss, supports_chunked_loss


class LoraPlus:
    """Mixed into a Trainer (this one, TRL's DPOTrainer): LoRA+ when ``loraplus_lr_ratio`` is set."""

    loraplus_lr_ratio: float | None = None

    def create_optimizer(self, model=None):
        """LoRA+ (train.lora.loraplus_lr_ratio): peft's optimizer groups, B's learning rate that many times A's,
        around the optimizer train.optimizer names; else the Trainer's own."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer


class TuneflowTrainer(LoraPlus, Trainer):
    def __init__(self, *args, token_batches=None, loss_chunk_tokens: int = 0, reentrant: bool = False,
                 loraplus_lr_ratio: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_batches = token_batches
        self.loss_chunk_tokens = loss_chunk_tokens
        self.reentrant = reentrant
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.chunked_loss = loss_chunk_tokens > 0 and supports_chunked_loss(self.model)

    def get_train_dataloader(self):
        if self.token_batches is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        loader = DataLoader(self.train_dataset, batch_sampler=self.token_batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_loss or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer then divides by the accumulation steps, as for the model's loss
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss, outputs = chunked_causal_lm_loss(model, inputs, labels, self.loss_chunk_tokens, num_items_in_batch,
                                               head=head, use_reentrant=self.reentrant)
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss
