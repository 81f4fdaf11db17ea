"""The one typed config tree of tuneflow.

This module is the YAML schema, the ``--set dotted.key=value`` override target, the Prefect flow parameter
(rendered as a form in the Prefect UI), the params logged to MLflow and what the training worker reads.
It imports pydantic only, so the Prefect deployment form keeps its descriptions and dropdowns.
"""

from __future__ import annotations

import os
import re
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from tuneflow.core.data_sources import DatasetConfig, SourceConfig
from tuneflow.core.evaluation import (
    JUDGE_DIRECTIONS,
    METRIC_DIRECTIONS,
    PAIR_METRICS,
    EvalConfig,
    RegistryConfig,
)
from tuneflow.core.objective import PREFERENCE_OBJECTIVES, Objective, PreferenceConfig
from tuneflow.core.section import Section, parse_size
from tuneflow.core.sweep import SweepConfig

LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
]
# train.optimizer: the HF Trainer's names that matter here (bitsandbytes' 8-bit, paged and Lion optimizers included).
Optimizer = Literal[
    "adamw_torch_fused", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit", "sgd",
]
# train.deepspeed presets: name -> (ZeRO stage, optimizer and parameters offloaded to the CPU); None: no DeepSpeed.
# tuneflow.training.deepspeed builds their configs, tuneflow.memory.estimate plans them.
DEEPSPEED_PRESETS: dict[str, tuple[int, bool] | None] = {
    "none": None, "zero0": (0, False), "zero1": (1, False), "zero2": (2, False), "zero3": (3, False),
    "zero3_offload": (3, True),
}
class ModelConfig(Section):
    name_or_path: str = Field(
        "Qwen/Qwen2.5-0.5B-Instruct",
        min_length=1,
        description="Hugging Face Hub model repo id (org/name), a local folder with config.json and weights, or a "
        "model the export stage logged to MLflow: models:/NAME/VERSION or models:/NAME@ALIAS (e.g. the SFT version "
        "to start DPO from; model.revision is then unused, the model id is recorded).",
    )
    revision: str = Field(
        "main", min_length=1, description="Branch, tag or commit of the Hub repo; the resolved commit SHA is recorded."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped in the model repo. Off unless you trust and pin the repo."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template to use when the tokenizer has none (or to replace its own)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel: auto = flash_attention_2 on a CUDA GPU where flash-attn is installed, "
        "else sdpa. Packed rows never attend to each other with any of them.")


class PrepConfig(Section):
    mix_strategy: Literal["interleave_under", "interleave_over", "concat"] = Field(
        "interleave_under", description="How datasets are mixed (as LLaMA-Factory names it): interleave_under draws "
        "rows to the weights until one source runs out; interleave_over until every source has been used once "
        "(smaller ones repeat); concat takes every row once, weights unused.")
    cutoff_len: int = Field(1024, ge=8, le=1_048_576, description="Maximum tokens per example; longer ones are cut.")
    on_invalid: Literal["error", "drop"] = Field(
        "error", description="A malformed row: error stops the run naming the row; drop skips it and counts it."
    )
    max_invalid_fraction: float = Field(
        0.1, ge=0, le=1, description="With on_invalid=drop: fail if more than this fraction of rows is dropped."
    )


class LoraConfig(Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r (8-64 typical; 16 or 32 is a good default).")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear",
        description="'all-linear' (what QLoRA found matches full fine-tuning) or a list of module names, "
        "e.g. [q_proj, v_proj] or [W_pack].",
    )
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output beside the low-rank direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(rank), for high ranks.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Adapter initialisation: default (B = 0), gaussian, or pissa / olora (from the base "
        "weights' SVD / QR, which they rewrite: method lora only; the saved adapter is converted to apply to the "
        "original base).")
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: B's learning rate is this many times A's (16 is the paper's); unset: off.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained whole and saved beside the adapter, e.g. [embed_tokens, "
        "lm_head] when tokens were added.")


class QuantizationConfig(Section):
    """How qlora quantises the frozen base (bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="4: 4-bit weights, the QLoRA paper's; 8: LLM.int8 weights (twice the "
                                "memory; type and double_quant do not apply).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (NormalFloat, the paper's choice) or "
                                        "fp4.")
    double_quant: bool = Field(True, description="Quantise the 4-bit blocks' scales too (saves ~0.37 bits per weight).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype the dequantised matmuls run in; auto: train.precision as resolved on the machine.")


class TrainConfig(Section):
    objective: Objective = Field(
        "sft", description="sft: supervised fine-tuning on the answers; dpo: Direct Preference Optimization on pairs "
        "of a chosen and a rejected answer (dataset.format: preference) through TRL's DPOTrainer, against the model "
        "it starts from as reference (qlora, lora: the base with the adapter switched off, or "
        "train.preference.init_adapter; full, freeze: a frozen copy of the model, in memory beside it); orpo: TRL's "
        "ORPOTrainer on the same pairs, no reference.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="Preference tuning (objective dpo or orpo).")
    method: Literal["qlora", "lora", "full", "freeze"] = Field(
        "qlora",
        description="qlora: LoRA over a quantised base (train.quantization: 4-bit NF4 by default); lora: LoRA over a "
        "16-bit base; full: every weight; freeze: only the top freeze_trainable_layers layers.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings (qlora and lora).")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig,
                                             description="The quantised base of qlora.")
    freeze_trainable_layers: int = Field(2, ge=1, description="With method=freeze: how many top layers train.")
    learning_rate: float = Field(2.0e-4, gt=0, le=1, description="Peak learning rate (5e-5 to 2e-4 for adapters).")
    lr_scheduler: LrScheduler = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    optimizer: Optimizer = Field(
        "adamw_torch_fused", description="`adamw_torch_fused`, `adamw_torch`: torch's AdamW, moments in the trained "
        "weights' dtype; `adamw_8bit`, `lion_8bit`: bitsandbytes' 8-bit states (a quarter of AdamW's memory); "
        "`paged_*`: the QLoRA paper's paged optimizers, states paged to CPU memory under GPU memory pressure (CUDA "
        "only); `adafactor`: factored second moments; `sgd`. `tuneflow plan` counts each one's state.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for AdamW and Lion).")
    neftune_noise_alpha: Optional[float] = Field(
        None, gt=0, description="NEFTune: uniform noise of this scale on the input embeddings while training (5 is "
        "the paper's); unset: off.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: float = Field(1, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; > 0 overrides epochs.")
    per_device_batch_size: Union[Literal["auto"], int] = Field(
        4, description="Rows per process per micro-batch (the eval-loss batch when tokens_per_batch is set); 'auto' = "
        "the largest the memory plan fits in train.gpu_memory (or the local GPU), 4 when neither is known."
    )
    tokens_per_batch: Union[Literal["auto"], int, None] = Field(
        None, description="With packing: micro-batches of whole rows holding up to this many real tokens, instead of "
        "per_device_batch_size rows (a row longer than the budget trains alone); 'auto' = the largest the memory plan "
        "fits; unset = row count."
    )
    gradient_accumulation_steps: int = Field(
        4, ge=1, description="Micro-batches per optimizer step; the loss is averaged over the labelled tokens of all "
        "of them, so micro-batches of different sizes weigh by their tokens."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute precision. auto, on the machine that trains or evaluates: bf16 on a GPU that has "
        "it (Ampere or newer), else fp16 (fp32 for full/freeze without DeepSpeed); on a CPU, bf16 where it is native "
        "(AVX512-BF16 or AMX), else fp32 (bf16 is emulated there, 30-40x slower). qlora keeps its 4-bit NF4 weights "
        "either way: only the compute dtype follows."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    loss_chunk_tokens: int = Field(
        256, ge=0, le=1_048_576, description="Chunked loss: the vocabulary projection and cross-entropy run on this "
        "many labelled tokens at a time, so the full logits are never held (same loss); 0 = the plain full-logits loss."
    )
    packing: bool = Field(
        True, description="Padding-free batches: the rows of a micro-batch are concatenated (position ids restart "
        "per row, attention never crosses rows) instead of padded to the longest; same loss, no compute on padding. "
        "Objective sft only: dpo and orpo pad each pair (TRL's collators)."
    )
    deepspeed: str = Field(
        "zero2",
        description=" | ".join(DEEPSPEED_PRESETS) + ", or the path of a DeepSpeed JSON file.",
    )
    nproc_per_node: Union[Literal["auto"], int] = Field(
        "auto", description="Training processes on this node: 'auto' = number of GPUs (1 on a CPU)."
    )
    save_steps: int = Field(100, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest deleted first).")
    eval_steps: int = Field(0, ge=0, description="Evaluate the held-out loss every N steps during training; 0 = off.")
    logging_steps: int = Field(1, ge=1, description="Log loss, learning rate, grad norm and tokens/s every N steps.")
    retries: int = Field(
        1, ge=0, le=10,
        description="Relaunches after a failed training attempt, each resuming from the last checkpoint."
    )
    seed: int = Field(42, ge=0, description="Seed for every rank, the data order and the eval split.")
    nnodes: int = Field(
        1, ge=1, description="GPU machines that train together. Above 1 the pipeline needs a training deployment "
        "(tuneflow-train/gpu, README 'Run it on a team's Prefect server'): the train stage starts one flow run per "
        "node, and node 0's address reaches the others through the Prefect API. When that deployment's work pool is "
        "of type kubernetes, the stage submits one Kubeflow Trainer TrainJob of N pods instead "
        "(docs/infrastructure.md)."
    )
    join_timeout: float = Field(
        600, gt=0, description="Multi-node: seconds every node waits for the others to join (node 0's address, "
        "torchrun's rendezvous), counted once its own model and data are ready; a node that has not joined by then "
        "fails the attempt, naming it."
    )
    gpu_memory: str | None = Field(
        None, description="Memory of each GPU that trains, e.g. 24GiB or 80GiB: the pre-flight refuses a config whose "
        "memory plan (tuneflow plan) does not fit it. Unset: the local GPU's, if there is one."
    )
    timeout_hours: float = Field(
        48, gt=0, description="Training on a work pool: the longest the pipeline waits for a training run, queued "
        "and running, before it cancels the run and fails."
    )
    master_port: int = Field(
        0, ge=0, le=65535, description="torchrun's rendezvous port on node 0; 0 picks a free one. Set it when only "
        "one port is open between the GPU machines."
    )

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or at least 1")
        return v

    @field_validator("per_device_batch_size", "tokens_per_batch")
    @classmethod
    def _batch_size(cls, v: Union[str, int, None], info) -> Union[str, int, None]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or at least 1")
        if info.field_name == "tokens_per_batch" and isinstance(v, int) and v < 8:
            raise ValueError("must be 'auto' or at least 8 tokens")
        return v

    @field_validator("packing")
    @classmethod
    def _token_budget_needs_packing(cls, v: bool, info) -> bool:
        if not v and info.data.get("tokens_per_batch") is not None:
            raise ValueError("must be true when train.tokens_per_batch is set (a token budget sizes packed "
                             "micro-batches); or unset train.tokens_per_batch to pad per_device_batch_size rows")
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _memory_size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_choice(cls, v: str) -> str:
        if v not in DEEPSPEED_PRESETS and not v.endswith(".json"):
            raise ValueError(f"must be one of {', '.join(DEEPSPEED_PRESETS)} or a path ending in .json")
        return v


class ExportConfig(Section):
    enabled: bool = Field(True, description="Merge the adapter into the base and write a standalone model.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. 2GB (2-5GB advised), 500MB.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Weight dtype of the exported model.")
    device: Literal["cpu", "auto"] = Field("cpu", description="Where the merge runs: cpu, or auto (GPU if any).")
    parity_samples: int = Field(8, ge=1, description="Evaluation prompts the exported model must answer as before.")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class HubConfig(Section):
    token_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the Hugging Face token; unset: HF_TOKEN or the "
        "token saved by `hf auth login`. The token itself never enters the config.",
    )


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; unset: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )
    experiment: str = Field("tuneflow", min_length=1, description="MLflow experiment name.")


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str | None) -> str:
    """The MLflow tracking URI: tracking.uri, else MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TuneflowConfig(Section):
    """A whole fine-tuning run: download -> prepare -> train -> evaluate -> export."""

    run_name: str = Field(
        "run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=80,
        description="Name of the run; its folder is output_dir/run_name-time-suffix, unique per run.",
    )
    output_dir: str = Field(
        "runs", min_length=1,
        description="Folder that holds the run folders (prepared data and downloaded artifacts go to $TUNEFLOW_CACHE).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    dataset: Optional[DatasetConfig] = Field(None, description="The instruction dataset (or datasets, to mix several).")
    datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Several instruction datasets mixed into one training set by their "
        "weights (prep.mix_strategy), e.g. [{name_or_path: org/a, weight: 3}, {name_or_path: org/b}]; instead of "
        "dataset.")
    eval_dataset: Optional[SourceConfig] = Field(
        None, description="A dataset of its own for evaluation (then every row of the training datasets trains), "
        "e.g. {name_or_path: org/eval-set}; unset: a held-out split of each training dataset (its eval_size).")
    prep: PrepConfig = Field(default_factory=PrepConfig, description="Tokenization.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation on the held-out split.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Merged, standalone model.")
    hub: HubConfig = Field(default_factory=HubConfig, description="Hugging Face Hub access.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="MLflow Model Registry: where `tuneflow retrain` registers and "
        "promotes.",
    )
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="`tuneflow sweep`: a search over config "
                               "keys (docs/sweeps.md).")

    @model_validator(mode="after")
    def _cross_field(self) -> "TuneflowConfig":
        problems = []
        t = self.train
        if (self.dataset is None) == (not self.datasets):
            problems.append("dataset: set dataset (one source) or datasets (a list of sources to mix), "
                            + ("not both" if self.datasets else "neither is set"))
        if t.method in ("full", "freeze") and t.deepspeed == "none" and t.precision == "fp16":
            problems.append("train.precision: fp16 without DeepSpeed needs an fp32 master copy; use bf16 or fp32")
        if t.lr_scheduler == "reduce_lr_on_plateau" and not t.eval_steps:
            problems.append("train.lr_scheduler: reduce_lr_on_plateau needs an eval loss; set train.eval_steps > 0")
        if self.model.trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", self.model.revision):
            problems.append(
                "model.revision: trust_remote_code runs code from the repo; pin model.revision to a full commit SHA"
            )
        if t.deepspeed == "zero3_offload" and t.method == "qlora":
            problems.append("train.deepspeed: zero3_offload cannot offload 4-bit weights; use zero3 with qlora")
        if t.method == "qlora" and t.quantization.bits == 8 and t.deepspeed.startswith("zero3"):
            problems.append(f"train.quantization.bits: ZeRO-3 ({t.deepspeed}) cannot shard 8-bit weights (it shards "
                            "4-bit ones, stored in the compute dtype); use bits: 4, or zero2")
        if t.method == "qlora" and t.quantization.bits == 8 and t.lora.use_dora:
            problems.append("train.lora.use_dora: peft's DoRA fails over 8-bit weights (their int8 scales are not "
                            "there when it reads the weight); use train.quantization.bits 4, or method lora")
        if t.method == "qlora" and t.lora.init in ("pissa", "olora"):
            problems.append(f"train.lora.init: {t.lora.init} rewrites the base weights, which qlora keeps quantised; "
                            "use method lora (or init default / gaussian)")
        if t.lora.init in ("pissa", "olora") and t.deepspeed.startswith("zero3"):
            problems.append(f"train.lora.init: {t.lora.init} needs each base weight whole, which ZeRO-3 shards; use "
                            "zero2")
        if t.deepspeed == "zero3_offload" and not t.optimizer.startswith("adamw_torch"):
            problems.append(f"train.optimizer: {t.optimizer} cannot step states offloaded to the CPU by zero3_offload "
                            "(DeepSpeed steps them with its CPU Adam); use adamw_torch, or zero3")
        formats = {f"{key}.format": source.format for key, source in self.sources}
        paired = [(key, m) for key, m in [("registry.metric", self.registry.metric),
                                          *(("registry.guards", g.metric) for g in self.registry.guards)]
                  if m in PAIR_METRICS]  # scored on held-out preference pairs
        if t.objective in PREFERENCE_OBJECTIVES:
            o = t.objective
            problems += [f"{key}: {fmt} rows have no rejected answer; train.objective {o} trains on pairs: use "
                         "format: preference (prompt, chosen, rejected)" for key, fmt in formats.items()
                         if fmt != "preference"]
            if t.method not in ("qlora", "lora") and t.preference.init_adapter:
                problems.append(f"train.preference.init_adapter: method {t.method} trains the model's own weights, "
                                "not an adapter; use method qlora or lora to go on training an adapter")
            if t.tokens_per_batch is not None:
                problems.append(f"train.tokens_per_batch: {o} batches pairs of padded rows; unset it and size "
                                "batches with per_device_batch_size")
            if t.lora.init in ("pissa", "olora"):
                problems.append(f"train.lora.init: {t.lora.init} with objective {o}: the base it rewrites would be "
                                "the reference; use init default or gaussian")
            if paired and self.eval_dataset is not None and self.eval_dataset.format != "preference":
                problems.append(f"registry.metric: {paired[0][1]} is scored on held-out pairs, and eval_dataset.format "
                                f"is {self.eval_dataset.format}; use a preference eval_dataset, or another metric")
            if t.eval_steps and self.eval_dataset is not None and self.eval_dataset.format != "preference":
                problems.append(f"train.eval_steps: {o}'s held-out loss needs pairs, and eval_dataset.format is "
                                f"{self.eval_dataset.format}; use a preference eval_dataset, or eval_steps: 0")
        else:
            problems += [f"{key}: preference pairs train with train.objective: dpo or orpo" for key, fmt
                         in formats.items() if fmt == "preference"]
            problems += [f"{key}: {metric} is scored on preference pairs: it needs train.objective dpo or orpo"
                         for key, metric in paired]
        if self.eval.judge and not self.eval.compare_base and not any(g.metric in JUDGE_DIRECTIONS
                                                                      for g in self.registry.guards):
            problems.append("eval.judge judges tuned vs base answers (set eval.compare_base true) or, in retrain, "
                            "challenger vs champion for a judge.* guard of registry.guards: neither is set")
        scored = [*METRIC_DIRECTIONS, *sorted(f"bench.{b.key}.{m}" for b in self.eval.benchmarks for m in ("acc",
                  "acc_norm")), *(JUDGE_DIRECTIONS if self.eval.judge else [])]
        if self.sweep.pruner != "none" and not t.eval_steps:
            problems.append(f"sweep.pruner: {self.sweep.pruner} stops trials by their held-out loss during training; "
                            "set train.eval_steps > 0 (how often it is measured)")
        if self.sweep.metric and self.sweep.metric not in scored:
            problems.append(f"sweep.metric: {self.sweep.metric} is no metric evaluate logs; one of {', '.join(scored)}")
        for guard in self.registry.guards:
            if guard.metric not in scored:
                problems.append(f"registry.guards: {guard.metric} is no metric a retrain scores (add its benchmark to "
                                f"eval.benchmarks, or eval.judge); one of {', '.join(scored)}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def sources(self) -> list[tuple[str, DatasetConfig]]:
        """The training datasets, each with the key it is configured under: dataset, or datasets.0, datasets.1..."""
        if self.dataset is not None:
            return [("dataset", self.dataset)]
        return [(f"datasets.{i}", d) for i, d in enumerate(self.datasets)]

    @property
    def all_sources(self) -> list[tuple[str, SourceConfig]]:
        """Every dataset a run reads, with its key: the training datasets (sources), then eval_dataset when set."""
        return [*self.sources, *([("eval_dataset", self.eval_dataset)] if self.eval_dataset else [])]

    def ignored_settings(self) -> list[str]:
        """Settings that do not apply to train.method (a preset or the UI form carries them): they are ignored,
        and the run log says so, so that switching the method never fails on them."""
        t, ignored = self.train, []
        if t.method not in ("qlora", "lora") and t.lora != LoraConfig():
            ignored.append(f"train.lora applies to methods qlora and lora, not {t.method}: ignored")
        if t.method != "qlora" and t.quantization != QuantizationConfig():
            ignored.append(f"train.quantization applies to method qlora, not {t.method}: ignored")
        if t.objective == "sft" and t.preference != PreferenceConfig():
            ignored.append("train.preference applies to objectives dpo and orpo, not sft: ignored")
        if t.objective != "sft" and t.loss_chunk_tokens != TrainConfig.model_fields["loss_chunk_tokens"].default:
            ignored.append(f"train.loss_chunk_tokens applies to objective sft (TRL computes {t.objective}'s loss): "
                           "ignored")
        if t.objective != "sft" and t.preference.init_adapter and t.lora != LoraConfig():
            ignored.append("train.lora: train.preference.init_adapter brings its own rank and targets: ignored")
        if t.objective == "orpo" and t.preference.loss_type != PreferenceConfig().loss_type:
            ignored.append("train.preference.loss_type applies to objective dpo, not orpo: ignored")
        default_layers = TrainConfig.model_fields["freeze_trainable_layers"].default
        if t.method != "freeze" and t.freeze_trainable_layers != default_layers:
            ignored.append(f"train.freeze_trainable_layers applies to method freeze only, not {t.method}: ignored")
        return ignored
