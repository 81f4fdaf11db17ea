"""How rows become micro-batches: packed (padding-free, the default) or padded.

Packed: the rows of a micro-batch are concatenated into one sequence with position ids that restart at 0 for every
row, and no attention mask. transformers then derives the row boundaries from the position ids, so attention never
crosses rows (flash-attention varlen where installed, else a block-diagonal mask for sdpa/eager), and the first
label of every row is -100 so no row learns to predict its neighbour's first token. That needs `use_cache=False`:
with a cache the boundaries are not detected and rows silently attend to each other. No padding token is computed.

Padded: every row is padded to the longest in the micro-batch, with an attention mask.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def collator(packing: bool, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


class CountingCollator:
    """A collator that also counts real tokens and batch positions, for the padding fraction."""

    def __init__(self, inner):
        self.inner, self.real, self.positions = inner, 0, 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        self.real += sum(len(f["input_ids"]) for f in features)
        self.positions += batch["input_ids"].numel()
        return batch

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real / self.positions if self.positions else 0.0
