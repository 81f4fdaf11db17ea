"""BLEU-4 and ROUGE on cases small enough to work out by hand (scores are 0-100)."""

import math

import pytest

from tuneflow.modeling.metrics import bleu4, rouge, score, segment


def f1(precision: float, recall: float) -> float:
    return 100 * 2 * precision * recall / (precision + recall)


# --- segmentation ------------------------------------------------------------------------------------------


def test_english_is_lowercased_and_punctuation_is_its_own_token():
    assert segment("Hello, World!") == ["hello", ",", "world", "!"]
    assert segment("The cat sat.") == ["the", "cat", "sat", "."]
    assert segment("  spaced   out  ") == ["spaced", "out"]


def test_chinese_is_segmented_into_words():
    assert segment("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert segment("我爱北京") == ["我", "爱", "北京"]


def test_chinese_segmentation_drops_whitespace():
    assert segment("我爱 北京") == ["我", "爱", "北京"]


# --- identical and disjoint --------------------------------------------------------------------------------


def test_identical_text_scores_100():
    # BLEU-4 needs at least one 4-gram in the corpus: with fewer than 4 tokens in all, it is 0 by definition.
    text = ["the cat sat on the mat", "a dog ran in the park today"]
    scores = score(text, text)
    assert scores["bleu-4"] == pytest.approx(100)
    assert scores["rouge-1"] == pytest.approx(100)
    assert scores["rouge-2"] == pytest.approx(100)
    assert scores["rouge-l"] == pytest.approx(100)


def test_disjoint_text_scores_0():
    scores = score(["green apples grow on trees"], ["a dog ran in the park"])
    assert scores == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_english_is_case_insensitive():
    scores = score(["THE CAT SAT ON THE MAT."], ["the cat sat on the mat."])
    assert scores["bleu-4"] == pytest.approx(100)
    assert scores["rouge-1"] == pytest.approx(100)
    assert scores["rouge-l"] == pytest.approx(100)


def test_punctuation_counts_as_a_token():
    # prediction [the, cat, sat], reference [the, cat, sat, "."]: P = 3/3, R = 3/4 -> F1 = 6/7
    assert rouge(["the cat sat"], ["the cat sat."])["rouge-1"] == pytest.approx(f1(1, 3 / 4))
    # "sat." against "sat ." is the same token sequence.
    assert rouge(["the cat sat ."], ["the cat sat."])["rouge-1"] == pytest.approx(100)


# --- ROUGE by hand -----------------------------------------------------------------------------------------


def test_rouge_partial_overlap_by_hand():
    # prediction "the cat" vs reference "the cat sat":
    #   ROUGE-1: 2 shared unigrams; P = 2/2 = 1, R = 2/3          -> F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    #   ROUGE-2: prediction bigrams {the cat}, reference {the cat, cat sat}, 1 shared; P = 1/1, R = 1/2
    #                                                             -> F1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3
    #   ROUGE-L: longest common subsequence "the cat" = 2 tokens: same as ROUGE-1
    scores = rouge(["the cat"], ["the cat sat"])
    assert scores["rouge-1"] == pytest.approx(80.0)
    assert scores["rouge-2"] == pytest.approx(66.6667, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(80.0)


def test_rouge_l_uses_the_longest_common_subsequence():
    # prediction [a, b, c, d], reference [a, c, b, d]: unigrams all shared (ROUGE-1 = 100); LCS is 3 long
    # (a b d or a c d), so ROUGE-L P = R = 3/4; bigrams: prediction {ab, bc, cd}, reference {ac, cb, bd}: none.
    scores = rouge(["a b c d"], ["a c b d"])
    assert scores["rouge-1"] == pytest.approx(100)
    assert scores["rouge-2"] == pytest.approx(0)
    assert scores["rouge-l"] == pytest.approx(75)


def test_rouge_is_the_mean_over_examples():
    # example 1 identical (100), example 2 disjoint (0)
    scores = rouge(["the cat sat", "red green"], ["the cat sat", "blue yellow"])
    assert scores["rouge-1"] == pytest.approx(50)


def test_rouge_needs_one_reference_per_prediction():
    with pytest.raises(ValueError):
        rouge(["a", "b"], ["a"])


def test_chinese_rouge_counts_words_not_characters():
    # prediction 我爱北京 -> [我, 爱, 北京] (3 words), reference 我爱北京天安门 -> [我, 爱, 北京, 天安门] (4 words)
    #   ROUGE-1: 3 shared; P = 3/3, R = 3/4 -> F1 = 6/7 = 85.71  (by characters it would be 4/4, 4/7 -> 72.73)
    #   ROUGE-2: bigrams [我爱, 爱北京] vs [我爱, 爱北京, 北京天安门]: 2 shared; P = 1, R = 2/3 -> F1 = 80
    scores = rouge(["我爱北京"], ["我爱北京天安门"])
    assert scores["rouge-1"] == pytest.approx(f1(1, 3 / 4))
    assert scores["rouge-1"] != pytest.approx(f1(1, 4 / 7))
    assert scores["rouge-2"] == pytest.approx(80)
    assert scores["rouge-l"] == pytest.approx(f1(1, 3 / 4))


def test_chinese_overlap_is_not_zero():
    # rouge-score's own tokenizer drops every non-ASCII character, which would make any Chinese score 0.
    # [北京, 今天, 下雨] vs [北京, 明天, 下雨]: 2 of 3 words shared -> P = R = 2/3 (by characters: 5 of 6)
    assert segment("北京今天下雨") == ["北京", "今天", "下雨"]
    scores = rouge(["北京今天下雨"], ["北京明天下雨"])
    assert scores["rouge-1"] == pytest.approx(f1(2 / 3, 2 / 3))
    assert scores["rouge-2"] == pytest.approx(0)  # bigrams [北京今天, 今天下雨] vs [北京明天, 明天下雨]


# --- BLEU-4 by hand ----------------------------------------------------------------------------------------


def test_bleu4_by_hand():
    # hypothesis: the cat sat on the mat      (6 tokens)
    # reference:  the cat sat on the red mat  (7 tokens)
    #   1-grams: all 6 in the reference ("the" twice in both)                      p1 = 6/6
    #   2-grams: the cat, cat sat, sat on, on the match; the mat does not           p2 = 4/5
    #   3-grams: the cat sat, cat sat on, sat on the match; on the mat does not     p3 = 3/4
    #   4-grams: the cat sat on, cat sat on the match; sat on the mat does not      p4 = 2/3
    #   brevity penalty: hypothesis shorter than reference, BP = exp(1 - 7/6)
    # BLEU-4 = BP * (p1 p2 p3 p4) ** (1/4)
    expected = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert expected == pytest.approx(67.318, abs=1e-3)
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the red mat"]) == pytest.approx(expected)


def test_bleu4_no_brevity_penalty_when_longer():
    # hypothesis: a b c d e (5), reference: a b c d (4): p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, BP = 1
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu4(["a b c d e"], ["a b c d"]) == pytest.approx(expected)


def test_bleu4_is_corpus_level():
    # n-gram counts and lengths are summed over the corpus before the formula (not a mean of sentence scores):
    #   pair 1: "a b c d" vs "a b c d"           matches 4/4, 3/3, 2/2, 1/1, lengths 4 vs 4
    #   pair 2: "w x y z" vs "w x y q"           matches 3/4, 2/3, 1/2, 0/1, lengths 4 vs 4
    #   corpus: p1 = 7/8, p2 = 5/6, p3 = 3/4, p4 = 1/2, BP = 1
    expected = 100 * (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert bleu4(["a b c d", "w x y z"], ["a b c d", "w x y q"]) == pytest.approx(expected)


def test_bleu4_on_english_uses_the_same_tokens_as_rouge():
    # "The cat sat on the mat." -> [the, cat, sat, on, the, mat, .] on both sides, in any case and spacing.
    assert bleu4(["The cat sat on the mat."], ["the  cat sat on the mat ."]) == pytest.approx(100)


def test_bleu4_on_chinese_counts_words():
    # hypothesis 我爱北京天安门 -> [我, 爱, 北京, 天安门]; reference 我爱北京天安门。 -> the same and "。" (5 words)
    assert segment("我爱北京天安门。") == ["我", "爱", "北京", "天安门", "。"]
    # p1..p4 = 4/4, 3/3, 2/2, 1/1; BP = exp(1 - 5/4). (By characters it would be 7 vs 8: BP = exp(1 - 8/7).)
    expected = 100 * math.exp(1 - 5 / 4)
    assert bleu4(["我爱北京天安门"], ["我爱北京天安门。"]) == pytest.approx(expected)


def test_score_has_every_metric_on_a_0_100_scale():
    scores = score(["the cat sat on the mat"], ["the cat sat on the red mat"])
    assert set(scores) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert all(0 < v < 100 for v in scores.values())


def test_preference_accuracy_and_margin_follow_the_implicit_reward():
    from tuneflow.modeling.metrics import preference

    # pair 1: the chosen answer gained 2 nats on the reference, the rejected lost 1 -> margin 0.1 * 3
    # pair 2: both moved alike -> a tie, no win; pair 3: the rejected one gained more -> a loss
    scores = preference(chosen=[-8.0, -5.0, -6.0], rejected=[-11.0, -4.0, -3.0], ref_chosen=[-10.0, -6.0, -6.0],
                        ref_rejected=[-10.0, -5.0, -4.0], beta=0.1)
    assert scores["pref_accuracy"] == pytest.approx(1 / 3)
    assert scores["pref_margin"] == pytest.approx((0.3 + 0.0 - 0.1) / 3)
    assert preference([-1.0], [-2.0], [-1.0], [-2.0], 0.1) == {"pref_accuracy": 0.0, "pref_margin": 0.0}
