"""train.tokens_per_batch: micro-batches sized by a budget of real tokens (tuneflow.training.batching).

Every micro-batch holds at most the budget, except a row longer than the budget, which trains alone; across 1, 2
and 3 ranks (dealt out by accelerate's own BatchSamplerShard, as in training) every row is seen exactly once per
epoch and every rank runs the same number of micro-batches; the batches depend only on the seed. Through the
Trainer, one epoch counts every real token once and runs the step count it planned.
"""

import random

import pytest
import torch

from tuneflow.training.batching import IGNORE_INDEX, TokenBudgetBatches


def lengths(n=300, seed=0):
    rng = random.Random(seed)
    return [min(480, max(5, int(rng.lognormvariate(4.3, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize("budget", [64, 256, 1000])
def test_every_micro_batch_stays_within_the_budget(budget):
    lens = lengths()
    sampler = TokenBudgetBatches(lens, budget, seed=1)
    batches = list(sampler)
    for batch in batches:
        tokens = sum(lens[i] for i in batch)
        if len(batch) > 1:
            assert tokens <= budget, (batch, tokens)
        else:
            assert tokens <= budget or lens[batch[0]] > budget
    too_long = [i for i, n in enumerate(lens) if n > budget]
    alone = {b[0] for b in batches if len(b) == 1}
    assert set(too_long) <= alone, "a row longer than the budget shares its micro-batch"
    # filled reasonably: greedy grouping leaves less than one row's worth unused on average
    if budget >= 256:
        assert sum(lens) / len(batches) > budget - max(lens)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_no_row_lost_or_repeated_across_ranks(world):
    from accelerate.data_loader import BatchSamplerShard

    lens = lengths(301)
    for epoch in (0, 1):
        seen, counts = [], []
        for rank in range(world):
            sampler = TokenBudgetBatches(lens, 512, seed=7, world=world)  # every rank builds its own, as in training
            sampler.set_epoch(epoch)
            shard = BatchSamplerShard(sampler, num_processes=world, process_index=rank, split_batches=False)
            mine = list(shard)
            assert len(mine) == len(shard)
            counts.append(len(mine))
            seen += [i for batch in mine for i in batch]
        assert len(set(counts)) == 1, f"ranks run different numbers of micro-batches: {counts}"
        assert sorted(seen) == list(range(len(lens))), "a row was lost or repeated"


def test_deterministic_and_reshuffled_per_epoch():
    lens = lengths()
    a, b = TokenBudgetBatches(lens, 400, seed=3), TokenBudgetBatches(lens, 400, seed=3)
    assert list(a) == list(b)
    assert list(TokenBudgetBatches(lens, 400, seed=4)) != list(a)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(second) == sorted(first) and len(a) == len(first)


def test_refuses_what_cannot_be_shared():
    with pytest.raises(ValueError, match="cannot be shared evenly by 2 ranks"):
        list(TokenBudgetBatches([100, 100, 100], 50, seed=0, world=2))
    with pytest.raises(ValueError, match="3 training rows cannot give each of 4 ranks"):
        TokenBudgetBatches([10, 10, 10], 50, seed=0, world=4)


def test_the_trainer_takes_its_micro_batches_from_the_budget(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from tuneflow.training.batching import CountingCollator, collator
    from tuneflow.training.trainer import TuneflowTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, use_cache=False))
    g = torch.Generator().manual_seed(0)
    lens = [5, 31, 9, 17, 26, 3, 12, 20, 40, 8, 14, 33]
    rows = []
    for n in lens:
        ids = torch.randint(10, 250, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:], "length": n})
    data = Dataset.from_list(rows)
    sampler = TokenBudgetBatches(data["length"], 48, seed=0)
    batches = CountingCollator(collator(True, None))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, num_train_epochs=1,
                             gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none", use_cpu=True,
                             include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
                             save_strategy="no", disable_tqdm=True, seed=0)
    sizes = []

    def collate(features):
        sizes.append(sum(len(f["input_ids"]) for f in features))
        return batches(features)

    trainer = TuneflowTrainer(model=model, args=args, train_dataset=data.select_columns(["input_ids", "labels"]),
                              data_collator=collate, token_batches=sampler, loss_chunk_tokens=16)
    assert trainer.chunked_loss
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(lens)  # every real token once, none twice
    assert trainer.state.global_step == -(-len(sampler) // 2)
    assert batches.real == sum(lens) and batches.padding_fraction == 0.0
    assert max(sizes) <= 48 and len(sizes) == len(sampler)
