"""What training optimises (train.objective) and the settings of preference tuning (train.preference).

    train: {objective: dpo, preference: {beta: 0.1, loss_type: sigmoid}}   # on rows of dataset.format: preference

sft trains on the answers of instruction data; dpo and orpo on pairs of a chosen and a rejected answer to one prompt,
through TRL's DPOTrainer (against a reference: the base, the adapter switched off) and ORPOTrainer (no reference: the
answers' odds ratio added to the chosen answer's loss).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneflow.core.section import Section

Objective = Literal["sft", "dpo", "orpo"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
# TRL's DPO loss types that need no setting besides beta (exo_pair needs label smoothing; aot, discopop extra terms).
DpoLoss = Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                  "sigmoid_norm"]


class PreferenceConfig(Section):
    """Preference tuning (train.objective: dpo or orpo)."""

    beta: float = Field(0.1, gt=0, le=10, description="dpo: how far the tuned model may move from the reference, "
                        "higher keeps it closer (DPO's beta; IPO's regularisation); orpo: the weight of the odds-ratio "
                        "term (the ORPO paper's lambda).")
    loss_type: DpoLoss = Field("sigmoid", description="dpo: TRL's DPO loss, sigmoid (the DPO paper's), ipo, hinge, "
                               "robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down, sigmoid_norm.")
    init_adapter: str | None = Field(
        None, description="Start from a trained adapter instead of a new one (a two-stage run: SFT, then DPO from "
        "it; dpo's reference is then that adapter, frozen): an earlier run's `runs:/RUN_ID/adapter` (its summary.json "
        "`stages.train.weights`) or a local folder; its rank and targets replace train.lora's.")
