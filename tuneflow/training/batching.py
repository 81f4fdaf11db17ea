"""How rows become micro-batches: packed (padding-free, the default) or padded.

Packed: the rows of a micro-batch are concatenated into one sequence with position ids that restart at 0 for every
row, and no attention mask. transformers then derives the row boundaries from the position ids, so attention never
crosses rows (flash-attention varlen where installed, else a block-diagonal mask for sdpa/eager), and the first
label of every row is -100 so no row learns to predict its neighbour's first token. That needs `use_cache=False`:
with a cache the boundaries are not detected and rows silently attend to each other. No padding token is computed.

Padded: every row is padded to the longest in the micro-batch, with an attention mask.

Token budget (`train.tokens_per_batch`, packing only): instead of a fixed number of rows, a micro-batch holds as many
whole rows as fit in the budget of real tokens (`TokenBudgetBatches`). Short rows then travel many to a batch and long
ones few, so every micro-batch costs about the same memory and time. A row longer than the budget trains alone (rows
are never split: a split row would lose its prompt). The rows are grouped once, in an order shuffled by train.seed;
every epoch then visits the same micro-batches in a new seeded order (as fairseq's batch_by_size does), so an epoch
always has the same number of them and the step count the Trainer plans is the one it runs. The batches are the same
on every rank; accelerate deals them out round-robin, and their number is made a multiple of the ranks by halving the
largest batches, so no row is dropped or repeated within an epoch.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def collator(packing: bool, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


class TokenBudgetBatches:
    """A batch sampler: row indices grouped, in a seeded shuffled order, into micro-batches of at most ``budget``
    tokens (a row longer than ``budget`` alone), their count a multiple of ``world``, visited in a new seeded order
    every epoch. The same on every rank."""

    def __init__(self, lengths: list[int], budget: int, seed: int, world: int = 1, shuffle: bool = True):
        if budget < 1 or world < 1:
            raise ValueError("budget and world must be positive")
        if len(lengths) < world:
            raise ValueError(f"{len(lengths)} training rows cannot give each of {world} ranks a micro-batch")
        self.lengths, self.budget, self.seed, self.world, self.shuffle = list(lengths), budget, seed, world, shuffle
        self.epoch = 0
        self._groups: list[list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def groups(self) -> list[list[int]]:
        """The micro-batches (lists of row indices), formed once."""
        if self._groups is not None:
            return self._groups
        import random

        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        batches, current, tokens = [], [], 0
        for i in order:
            n = self.lengths[i]
            if current and tokens + n > self.budget:
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += n
        if current:
            batches.append(current)
        # Every rank must run the same number of micro-batches: split the batches with the most tokens in two
        # (each half stays within budget) until the count divides evenly. Single over-long rows cannot be split.
        while len(batches) % self.world:
            splittable = [k for k, b in enumerate(batches) if len(b) > 1]
            if not splittable:
                raise ValueError(f"{len(batches)} micro-batches of one row each cannot be shared evenly by "
                                 f"{self.world} ranks; raise train.tokens_per_batch")
            k = max(splittable, key=lambda j: sum(self.lengths[i] for i in batches[j]))
            rows = batches.pop(k)
            total, half, acc = sum(self.lengths[i] for i in rows), 0, 0
            while half < len(rows) - 1 and acc + self.lengths[rows[half]] <= total / 2:
                acc += self.lengths[rows[half]]
                half += 1
            half = max(half, 1)
            batches[k:k] = [rows[:half], rows[half:]]
        self._groups = batches
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches in the order of ``epoch`` (the same on every rank)."""
        import random

        batches = list(self.groups())
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(batches)
        return batches

    def __iter__(self):
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        return len(self.groups())


class CountingCollator:
    """A collator that also counts real tokens and batch positions, for the padding fraction."""

    def __init__(self, inner):
        self.inner, self.real, self.positions = inner, 0, 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        if "input_ids" in features[0]:
            self.real += sum(len(f["input_ids"]) for f in features)
            self.positions += batch["input_ids"].numel()
        else:  # preference pairs, padded by TRL's collators: DPO's both answers in one batch, ORPO's in two
            masks = [batch[k] for k in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")
                     if k in batch]
            self.real += sum(int(m.sum()) for m in masks)
            self.positions += sum(m.numel() for m in masks)
        return batch

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real / self.positions if self.positions else 0.0
