"""Chat messages -> token ids through the tokenizer's chat template, with only the answers as labels."""

import pytest

from tests.support.chat import assistant, system, user
from tuneflow.data.tokenize import IGNORE_INDEX, TemplateError, encode, prompt_and_reference
from tuneflow.modeling.demo import CHATML_TEMPLATE, build_tokenizer

TEXTS = [
    "You are a helpful assistant. system user assistant",
    "Add 2 and 3. 2 plus 3 is 5.",
    "Reverse apple river. river apple",
    "Be brief. Add 1 and 2. 3.",
] * 4
SINGLE = [user("Add 2 and 3."), assistant("2 plus 3 is 5.")]
MULTI = [
    system("Be brief."),
    user("Add 1 and 2."),
    assistant("3."),
    user("Reverse apple river."),
    assistant("river apple"),
]
# What CHATML_TEMPLATE renders, written out by hand. Without a system message it inserts a default one; every
# turn ends with "<|im_end|>\n", so each answer's labels are its content followed by "<|im_end|>\n".
SINGLE_SEGMENTS = [
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n",
        False,
    ),
    ("2 plus 3 is 5.<|im_end|>\n", True),
]
MULTI_SEGMENTS = [
    (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nAdd 1 and 2.<|im_end|>\n"
        "<|im_start|>assistant\n",
        False,
    ),
    ("3.<|im_end|>\n", True),
    ("<|im_start|>user\nReverse apple river.<|im_end|>\n<|im_start|>assistant\n", False),
    ("river apple<|im_end|>\n", True),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TEXTS, out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)  # a fresh one per test: some tests change the template


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(tokenizer, enc) -> list[tuple[str, bool]]:
    """The encoded text cut into maximal runs of masked / labelled tokens, each decoded."""
    out: list[tuple[list[int], bool]] = []
    for tok, label in zip(enc["input_ids"], enc["labels"], strict=True):
        labelled = label != IGNORE_INDEX
        if out and out[-1][1] == labelled:
            out[-1][0].append(tok)
        else:
            out.append(([tok], labelled))
    return [(decode(tokenizer, ids), labelled) for ids, labelled in out]


def test_tokenizer_carries_the_chatml_template(tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    ("messages", "segments"), [(SINGLE, SINGLE_SEGMENTS), (MULTI, MULTI_SEGMENTS)], ids=["single-turn", "multi-turn"]
)
def test_render_and_mask(tokenizer, messages, segments):
    enc = encode(tokenizer, messages, cutoff_len=1024)
    ids, labels = enc["input_ids"], enc["labels"]
    full_text = "".join(text for text, _ in segments)
    answers = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")

    assert decode(tokenizer, ids) == full_text
    assert decode(tokenizer, [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == answers
    assert len(labels) == len(ids) == enc["length"] == enc["full_length"]
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(ids, labels))
    # System, user and generation-prompt tokens are all masked; each answer (with its end of turn) is labelled.
    assert runs(tokenizer, enc) == segments


def test_answer_end_of_turn_token_is_a_label(tokenizer):
    enc = encode(tokenizer, SINGLE, cutoff_len=1024)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labelled_im_end = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label == im_end]
    assert len(labelled_im_end) == 1  # the answer's, not the system's or the user's
    assert enc["input_ids"].count(im_end) == 3


def test_cutoff_len_truncates_ids_and_labels_alike(tokenizer):
    full = encode(tokenizer, MULTI, cutoff_len=1024)
    n = full["full_length"]
    for cutoff in (8, n // 2, n - 1, n, n + 10):
        cut = encode(tokenizer, MULTI, cutoff_len=cutoff)
        keep = min(cutoff, n)
        assert cut["input_ids"] == full["input_ids"][:keep]
        assert cut["labels"] == full["labels"][:keep]
        assert len(cut["input_ids"]) == len(cut["labels"]) == cut["length"] == keep
        assert cut["full_length"] == n


def test_cutoff_before_the_answer_leaves_no_labels(tokenizer):
    cut = encode(tokenizer, SINGLE, cutoff_len=8)
    assert cut["labels"] == [IGNORE_INDEX] * 8


def test_template_that_is_not_prefix_stable_raises(tokenizer):
    # Puts the number of turns first: adding a turn changes the text rendered for the earlier ones.
    tokenizer.chat_template = (
        "{{ messages | length }}"
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(TemplateError):
        encode(tokenizer, SINGLE, cutoff_len=1024)


def test_other_prefix_stable_template_is_masked_too(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )
    enc = encode(tokenizer, SINGLE, cutoff_len=1024)
    assert runs(tokenizer, enc) == [("### user:\nAdd 2 and 3.\n\n### assistant:\n", False), ("2 plus 3 is 5.\n\n",
                                                                                             True)]


def test_prompt_and_reference():
    assert prompt_and_reference(MULTI) == (MULTI[:-1], "river apple")


