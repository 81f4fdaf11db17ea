"""Padding-free packing (train.packing, the default) computes exactly what padded batches compute.

On a tiny Llama in fp32, with sdpa and with eager attention: the loss and every gradient of a packed micro-batch
equal those of the same rows padded; a row's logits do not change when another row of the batch changes (attention
never crosses rows); and the Trainer counts the same real tokens in both modes (what tokens/s is computed from).
"""

import pytest
import torch

from tests.support.fp32 import rows, tiny_model
from tuneflow.training.batching import collator


@pytest.fixture(scope="module", params=["sdpa", "eager"])  # the attention kernels that train here (flash attention
def tiny(tmp_path_factory, request):  # 2 and FlexAttention need a GPU: tuneflow refuses them on a CPU)
    return tiny_model(tmp_path_factory.mktemp("tiny"), request.param)


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(tiny):
    model, tokenizer = tiny
    batch = rows([7, 23, 12, 40])
    padded = collator(False, tokenizer)(batch)
    packed = collator(True, tokenizer)(batch)
    assert "attention_mask" in padded and "attention_mask" not in packed  # an all-ones mask would join the rows
    assert packed["input_ids"].shape == (1, 7 + 23 + 12 + 40) and padded["input_ids"].shape == (4, 40)

    loss_padded, grads_padded = loss_and_grads(model, padded)
    loss_packed, grads_packed = loss_and_grads(model, packed)
    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    assert grads_packed.keys() == grads_padded.keys() and grads_padded
    for name, grad in grads_padded.items():
        diff = (grads_packed[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert diff < 1e-4, f"{name}: gradients differ by {diff:.2e} (relative L2)"


@torch.no_grad()
def test_a_row_never_sees_another_row(tiny):
    model, tokenizer = tiny
    a, b = rows([15, 20], seed=1)
    other_a = rows([15], seed=2)[0]
    logits = [model(**collator(True, tokenizer)([first, b])).logits[0, 15:] for first in (a, other_a)]
    alone = model(**collator(True, tokenizer)([b])).logits[0]
    assert torch.allclose(logits[0], logits[1], atol=1e-5), "row B's logits depend on row A"
    assert torch.allclose(logits[0], alone, atol=1e-5), "row B's logits differ from B alone"


def test_the_trainer_counts_the_same_real_tokens_packed_and_padded(tiny, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, tokenizer = tiny
    data = Dataset.from_list(rows([5, 31, 9, 17, 26, 3, 12, 20]))
    seen = {}
    for packing in (False, True):
        args = TrainingArguments(output_dir=str(tmp_path / str(packing)), per_device_train_batch_size=4,
                                 max_steps=2, learning_rate=0.0, report_to="none", use_cpu=True,
                                 include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
                                 save_strategy="no", disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator(packing, tokenizer),
                          processing_class=tokenizer)
        trainer.train()
        seen[packing] = trainer.state.num_input_tokens_seen
    assert seen[True] == seen[False] == sum(len(r["input_ids"]) for r in data)
