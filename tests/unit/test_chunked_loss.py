"""The chunked loss (train.loss_chunk_tokens, the default) is the standard loss without the full logits.

fp32 on the CPU, a tiny Llama with sdpa attention: the chunked loss and every gradient equal those of the model's
own full-logits loss, on padded and on packed batches, with chunks smaller than, equal to and larger than the
labelled tokens, with LoRA on the decoder and on lm_head, and normalised by an accumulated step's token count as the
Trainer passes it. The model's forward never projects more than one chunk of positions onto the vocabulary.
"""

import pytest
import torch

from tests.support.fp32 import rows, tiny_model
from tuneflow.training.batching import collator
from tuneflow.training.loss import chunked_causal_lm_loss, supports_chunked_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def standard(model, batch, num_items=None):
    model.zero_grad()
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.item(), grads(model)


def chunked(model, batch, chunk, num_items=None):
    model.zero_grad()
    inputs = dict(batch)
    labels = inputs.pop("labels")
    loss, outputs = chunked_causal_lm_loss(model, inputs, labels, chunk, num_items)
    loss.backward()
    assert outputs.logits.shape[0] == 0  # the model's own lm_head call projected nothing
    return loss.item(), grads(model)


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_b.items():
        diff = (grads_a[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert diff < 1e-5, f"{name}: gradients differ by {diff:.2e} (relative L2)"


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("chunk", [5, 32, 10_000])
def test_chunked_loss_equals_the_full_logits_loss(tiny, packing, chunk):
    model, tokenizer = tiny
    batch = collator(packing, tokenizer)(rows([7, 23, 12, 40]))
    assert supports_chunked_loss(model)
    assert_same(chunked(model, batch, chunk), standard(model, batch))
    # as the Trainer calls it in gradient accumulation: divided by the labelled tokens of the whole step
    assert_same(chunked(model, batch, chunk, num_items=torch.tensor(123)), standard(model, batch, torch.tensor(123)))


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_loss_with_lora_on_the_decoder_and_lm_head(tiny, packing):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    try:
        assert supports_chunked_loss(peft_model)
        batch = collator(packing, tokenizer)(rows([9, 30, 17], seed=3))
        a, b = chunked(peft_model, batch, 8), standard(peft_model, batch)
        assert any("lm_head.lora" in n for n in a[1]) and all("lora" in n for n in a[1])
        assert_same(a, b)
    finally:
        peft_model.unload()
        model.requires_grad_(True)  # peft froze the base


def test_no_more_than_one_chunk_of_logits_is_projected(tiny):
    model, tokenizer = tiny
    batch = collator(True, tokenizer)(rows([40, 40, 40, 40]))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        chunked(model, batch, 16)
    finally:
        hook.remove()
    labelled = sum(n - n // 2 - 1 for n in (40, 40, 40, 40))
    assert max(seen) == 16 and sum(s for s in seen) >= labelled  # recomputation in backward adds the same chunks
