"""The training worker: what torchrun launches on every rank. It never imports Prefect.

    torchrun --nproc_per_node 2 -m tuneflow.training.worker runs/demo-1a2b3c/train/spec.json

The spec (`tuneflow.training.spec.TrainSpec`, written by `tuneflow.training.launch.run`) holds the validated config and
the folders on this machine: base model, prepared dataset, output. Rank 0 alone writes files and logs to the MLflow
run named by MLFLOW_RUN_ID, and uploads each complete checkpoint there. A rank that fails writes its error to
<output>/errors/rank<N>.txt so the launcher can say which rank died and why.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from tuneflow.core.files import install, staging_path
from tuneflow.core.results import STOP_TAG
from tuneflow.modeling.precision import resolved
from tuneflow.training.batching import CountingCollator, TokenBudgetBatches, collator
from tuneflow.training.checkpoints import (
    COMPLETE,
    CheckpointUploader,
    checkpoint_step,
    commit_checkpoint,
    last_complete_checkpoint,
    verify_adapter,
)
from tuneflow.training.efficiency import flops_per_token, peak_flops, peak_memory_of_every_rank
from tuneflow.training.spec import TrainOutcome, TrainSpec

RANK = int(os.environ.get("RANK", 0))
IS_RANK_ZERO = RANK == 0


def log(msg: str) -> None:
    if IS_RANK_ZERO:
        print(f"[train] {msg}", flush=True)


def build_model(cfg, model_dir: str, conversion_dir: Path | None = None, start_from: str | None = None):
    """The trainable model for train.method: LoRA over NF4 (qlora) or bf16 (lora), all weights, or top layers.
    ``start_from``: an adapter folder to go on training (train.preference.init_adapter) instead of a new adapter;
    ``conversion_dir``: where PiSSA/OLoRA keep the initial adapter, to convert the trained one when saving."""
    from peft import LoraConfig, get_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled

    from tuneflow.modeling.load import device, load_base

    # ZeRO-3 places (and shards) the weights itself and refuses a device_map.
    device_map = {"": device()} if cfg.train.method == "qlora" and not is_deepspeed_zero3_enabled() else None
    model = load_base(model_dir, cfg, quantized=True, device_map=device_map)
    model.config.use_cache = False
    t = cfg.train
    # No prepare_model_for_kbit_training: it upcasts every frozen non-4-bit weight (embeddings, lm_head, norms) to
    # fp32, doubling their memory for nothing the compute dtype cannot do (TRL >= 1.7 skips it too).
    if start_from is not None:  # train.preference.init_adapter: go on training it (its own rank and targets)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, start_from, is_trainable=True)
    if t.method in ("qlora", "lora"):
        lora = LoraConfig(
            r=t.lora.rank,
            lora_alpha=t.lora.alpha,
            lora_dropout=t.lora.dropout,
            target_modules=t.lora.target_modules,
            use_dora=t.lora.use_dora,
            use_rslora=t.lora.use_rslora,
            init_lora_weights=True if t.lora.init == "default" else t.lora.init,
            modules_to_save=t.lora.modules_to_save or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if t.lora.init in ("pissa", "olora"):  # the base now holds the residual: keep the initial adapter, to convert
            model.peft_config["default"].init_lora_weights = True  # the trained one into an adapter of the original
            if IS_RANK_ZERO:  # base when saving (as peft documents it); reloading either must not initialise again
                model.save_pretrained(conversion_dir)
    elif t.method == "freeze":
        layers = model.config.num_hidden_layers
        keep = {f"layers.{i}." for i in range(max(0, layers - t.freeze_trainable_layers), layers)}
        for name, param in model.named_parameters():
            param.requires_grad = any(k in name for k in keep)
    return model


class MlflowStepLogger:
    """Rank 0 logs loss, learning rate, grad norm, tokens/s, the padding fraction and (on a GPU) MFU once per
    logging step to the attached run (tuneflow.training.efficiency says how each is counted)."""

    def __init__(self, batches: CountingCollator, flops_per_token: float | None, peak_flops: float | None):
        from mlflow import MlflowClient

        self.run_id = os.environ.get("MLFLOW_RUN_ID")
        self.client = MlflowClient() if self.run_id and IS_RANK_ZERO else None
        self.last = (time.perf_counter(), 0)
        self.batches, self.flops_per_token, self.peak_flops = batches, flops_per_token, peak_flops

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.client:
            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def __call__(self, state, logs: dict) -> None:
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if "loss" in logs:
            then, before = self.last
            metrics["tokens_per_s"] = (tokens - before) / max(now - then, 1e-9)
            metrics["padding_fraction"] = self.batches.padding_fraction
            if self.flops_per_token and self.peak_flops:
                metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self.peak_flops
            self.last = (now, tokens)
        for noisy in ("epoch", "num_input_tokens_seen", "train_tokens_per_second"):
            metrics.pop(noisy, None)
        log(f"step {state.global_step}/{state.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self.log_metrics(metrics, state.global_step)


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def agree_on_precision(precision: str, args) -> None:
    """One model trains in one precision: nodes that resolved train.precision differently (mixed hardware) fail the
    attempt here, before the model is built, naming each node's result."""
    import torch.distributed as dist

    from tuneflow.modeling.precision import this_machine

    args.device  # noqa: B018 -- sets up the process group (gloo/NCCL) if the Trainer has not yet
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (int(os.environ.get("GROUP_RANK", 0)), precision, this_machine().describe()))
    nodes = dict((node, (p, where)) for node, p, where in sorted(seen))
    if len({p for p, _ in nodes.values()}) > 1:
        each = "; ".join(f"node {node}: {p} on {where}" for node, (p, where) in nodes.items())
        raise RuntimeError(f"the nodes resolved train.precision differently ({each}); one model trains in one "
                           "precision: set train.precision to one that every node runs (fp32 runs everywhere)")


def train(spec: TrainSpec) -> TrainOutcome:
    import torch
    from datasets import load_from_disk
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

    from tuneflow.memory.auto import resolve_auto_batches
    from tuneflow.modeling.load import load_tokenizer
    from tuneflow.training.deepspeed import deepspeed_config
    from tuneflow.training.trainer import TuneflowTrainer

    world = int(os.environ.get("WORLD_SIZE", 1))
    model_config = json.loads((Path(spec.model_dir) / "config.json").read_text())
    # 'auto' batch sizes are resolved by the train stage before launch (the same value on every rank); a spec written
    # by hand may still hold one, resolved here the same way.
    cfg, notes = resolve_auto_batches(spec.config, model_config, world_size=world)
    for note in notes:
        log(note)
    # 'auto' precision is resolved by the train stage on each node; a spec written by hand is resolved here.
    precision = resolved(cfg)
    if precision.precision != cfg.train.precision:
        log(precision.reason)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision.precision})})
    t = cfg.train
    out = Path(spec.output_dir)
    set_seed(t.seed)
    on_gpu = torch.cuda.is_available()

    # TrainingArguments first: with ZeRO-3 it must exist before the model is built.
    ds_config = deepspeed_config(t.deepspeed)
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3
    Arguments, objective_args = TrainingArguments, {}
    if t.objective != "sft":
        from tuneflow.training.preference import arguments

        Arguments, objective_args = arguments(cfg)
    args = Arguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.per_device_batch_size,  # unused for training when tokens_per_batch is set
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        neftune_noise_alpha=t.neftune_noise_alpha,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        # PEFT under ZeRO-3 fails with non-reentrant checkpointing on GPUs (transformers #47254), as TRL found.
        gradient_checkpointing_kwargs={"use_reentrant": zero3 and t.method in ("qlora", "lora")},
        deepspeed=ds_config,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=None,  # pruned by OnSave, only once the newer checkpoint is complete
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        prediction_loss_only=True,  # the held-out loss is all the worker evaluates; no logits are gathered
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        ddp_backend=None if on_gpu else "gloo",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **objective_args,
    )
    agree_on_precision(t.precision, args)
    if ds_config is not None and not on_gpu:
        # DeepSpeed reads the world size through its own comm layer, which accelerate starts on GPUs only: without it
        # transformers' zero.Init (full, freeze under ZeRO-3) and a DPO reference's engine see one rank.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = load_tokenizer(spec.model_dir, cfg)
    data = load_from_disk(spec.data_dir)
    model = build_model(cfg, spec.model_dir, out / "adapter-init", spec.init_adapter_dir)
    if spec.init_adapter_dir:
        log(f"starting from the adapter {t.preference.init_adapter}")
    if IS_RANK_ZERO and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()

    batches = CountingCollator(collator(t.packing, tokenizer))
    train_rows = data["train"].select_columns(["input_ids", "labels"])
    token_batches = None
    loraplus = t.lora.loraplus_lr_ratio if t.method in ("qlora", "lora") else None
    if t.tokens_per_batch is not None:
        token_batches = TokenBudgetBatches(data["train"]["length"], t.tokens_per_batch, t.seed, world)
        sizes = [len(b) for b in token_batches.groups()]
        log(f"token budget {t.tokens_per_batch}: {len(train_rows)} rows in {len(sizes)} micro-batches of "
            f"{min(sizes)}-{max(sizes)} rows ({len(train_rows) / len(sizes):.1f} on average), "
            f"{len(sizes) // world} per rank per epoch")
    peak = peak_flops()
    step_logger = MlflowStepLogger(batches, flops_per_token(cfg, model_config), peak and peak * world)
    uploader = CheckpointUploader(step_logger.run_id, log) if step_logger.client else None

    class OnLog(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            step_logger.last = (time.perf_counter(), state.num_input_tokens_seen)
            while hasattr(optimizer, "optimizer"):  # accelerate's and DeepSpeed's wrappers around the Trainer's own
                optimizer = optimizer.optimizer
            name = f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"
            log(f"optimizer: {t.optimizer} ({name})")
            if step_logger.client:
                step_logger.client.set_tag(step_logger.run_id, "tuneflow.optimizer_class", name)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                step_logger(state, logs)

    class OnSave(TrainerCallback):
        """Runs after every rank has returned from writing checkpoint-N: wait for all, then mark it complete."""

        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                commit_checkpoint(folder, t.save_total_limit)
                if uploader:
                    uploader.submit(folder)

    class StopWhenAsked(TrainerCallback):
        """After each evaluation, stop when the train run's MLflow tag tuneflow.stop says so (a sweep's pruner):
        rank 0 reads it and every rank learns its answer, so all stop at the same step."""

        stopped: str | None = None

        def on_evaluate(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            why = None
            if step_logger.client:
                try:
                    why = step_logger.client.get_run(step_logger.run_id).data.tags.get(STOP_TAG)
                except Exception as exc:  # not asked, as far as rank 0 can tell: the others wait in the broadcast
                    log(f"could not read {STOP_TAG} ({type(exc).__name__}); training goes on")
            asked = torch.tensor([1 if why else 0], device=args.device)
            if dist.is_initialized():
                dist.broadcast(asked, 0)
            if asked.item():
                self.stopped = why or "asked to stop"
                log(f"stopping after step {state.global_step}: {self.stopped}")
                control.should_training_stop = True

    stop = StopWhenAsked()
    if t.objective != "sft":
        from tuneflow.training.preference import preference_trainer

        trainer, step_logger.batches = preference_trainer(cfg, model, args, data["train"],
                                                          data["eval"] if t.eval_steps else None, tokenizer,
                                                          [OnLog(), OnSave(), stop], loraplus)
        reference = "the starting adapter" if t.method in ("qlora", "lora") else "a copy of the starting model"
        dpo = f", {t.preference.loss_type}), reference: {reference}, frozen" if t.objective == "dpo" else ")"
        log(f"loss: TRL's {t.objective.upper()} (beta {t.preference.beta}{dpo}")
    else:
        trainer = TuneflowTrainer(
            model=model,
            args=args,
            token_batches=token_batches,
            loss_chunk_tokens=t.loss_chunk_tokens,
            reentrant=args.gradient_checkpointing_kwargs["use_reentrant"],
            loraplus_lr_ratio=loraplus,
            train_dataset=train_rows,
            eval_dataset=data["eval"].select_columns(["input_ids", "labels"]) if t.eval_steps else None,
            data_collator=batches,
            processing_class=tokenizer,
            callbacks=[OnLog(), OnSave(), stop],
        )
        chunked = f"chunked, {t.loss_chunk_tokens} labelled tokens at a time"
        log(f"loss: {chunked if trainer.chunked_loss else 'full logits'}")
    trainer.remove_callback(PrinterCallback)  # OnLog prints one line per step instead
    resume = last_complete_checkpoint(out / "checkpoints")
    resumed_from = checkpoint_step(resume) if resume else None
    if IS_RANK_ZERO:
        for partial in (out / "checkpoints").glob("checkpoint-*"):
            if not (partial / COMPLETE).is_file():
                log(f"discarding {partial.name}: its save never finished")
                shutil.rmtree(partial, ignore_errors=True)
    if resume:
        log(f"resuming from {resume} (step {resumed_from})")
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if uploader:
            uploader.close()

    memory = peak_memory_of_every_rank()  # every rank takes part
    log("peak memory: " + ", ".join(f"{k}={v / 2**30:.2f} GiB" for k, v in memory.items()))
    step_logger.log_metrics(memory, trainer.state.global_step)

    # Write the final weights beside their final name, then rename: no half-written adapter is ever visible.
    final = out / ("adapter" if t.method in ("qlora", "lora") else "model")
    staging = staging_path(final)
    if t.lora.init in ("pissa", "olora") and t.method == "lora":  # an adapter of the original base (rank 2r)
        if IS_RANK_ZERO:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                str(staging), path_initial_model_for_weight_conversion=str(out / "adapter-init"))
    else:
        trainer.save_model(str(staging))  # every rank takes part: ZeRO-3 gathers the shards here
    if IS_RANK_ZERO:
        if t.objective != "sft":
            from tuneflow.training.preference import drop_reference_adapter

            drop_reference_adapter(staging)
        verify_adapter(staging)
        tokenizer.save_pretrained(staging)
        install(staging, final)
        plot_loss(trainer.state.log_history, out / "loss_curve.png")
    return TrainOutcome(weights_dir=str(final), global_step=trainer.state.global_step,
                        train_loss=result.training_loss, resumed_from_step=resumed_from,
                        log_history=trainer.state.log_history, stopped=stop.stopped)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m tuneflow.training.worker SPEC_JSON (written by tuneflow.training.launch.run)")
    spec = TrainSpec.model_validate_json(Path(sys.argv[1]).read_text())
    out = Path(spec.output_dir)
    import torch.distributed as dist

    try:
        result = train(spec)
        if IS_RANK_ZERO:
            (out / "result.json").write_text(result.model_dump_json(indent=1))
            log(f"done: {result.global_step} steps, train loss {result.train_loss:.4f}")
        # No rank leaves while another still writes: a rank tearing gloo down early can abort its peers.
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException as exc:
        errors = out / "errors"
        errors.mkdir(parents=True, exist_ok=True)
        (errors / f"rank{RANK}.txt").write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        raise
    # Done and written: leave without running C++ static destructors, where a still-joinable communication thread
    # (gloo, DeepSpeed's shared-memory op) now and then calls std::terminate and turns a finished run into SIGABRT.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
