"""Task metrics against hand-computed values: SQuAD exact match / F1 and its answer
normalisation, BLEU's brevity penalty and chrF's recall weighting (where swapping
prediction and reference changes the score), ROUGE with stemming and several references."""

import math

import pytest

from jaxlm.evaluation.overlap import bleu_chrf, rouge
from jaxlm.evaluation.squad import exact_match, f1, normalize_answer, squad_scores


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Denver Broncos", "denver broncos"),  # case, article
        ("  an   apple,\ta day! ", "apple day"),  # articles, punctuation, whitespace
        ("Theory of the Atom", "theory of atom"),  # 'the' only as a word
        ("A.B.C.", "abc"),  # punctuation goes first: 'a.' is no article then
        ("the-end", "theend"),
        ("20–18", "20–18"),  # an en dash is not in string.punctuation, as in SQuAD's script
        ("Saint-Étienne's", "saintétiennes"),
    ],
)
def test_squad_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_squad_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # pred {denver, broncos, team} vs gold {denver, broncos}: P 2/3, R 1, F1 0.8
    assert f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count as a bag: pred {a:..} -> "cat cat" vs "cat": P 1/2, R 1
    assert f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1("the", "a") == 0.0  # both normalise to nothing: no common token
    # the best over gold answers: example 1 matches its second gold exactly;
    # example 2: 'in 1912' vs golds '1912' (P 1/2, R 1 -> 2/3) and 'in May 1912' (P 1, R 2/3
    # -> 0.8): F1 0.8, EM 0
    got = squad_scores(
        ["Broncos", "in 1912"], [["Panthers", "the Broncos"], ["1912", "in May 1912"]]
    )
    assert got["exact_match"] == pytest.approx(50.0)
    assert got["f1"] == pytest.approx(100 * (1.0 + 0.8) / 2)


def test_bleu_brevity_penalty_makes_it_asymmetric():
    short, long = "a b c d e", "a b c d e f g h"
    # short vs long: every n-gram precision 1, brevity penalty exp(1 - 8/5)
    got = bleu_chrf([short], [long])
    assert got["bleu"] == pytest.approx(100 * math.exp(1 - 8 / 5), abs=1e-6)
    # long vs short: no penalty; precisions 5/8, 4/7, 3/6, 2/5, geometric mean
    swapped = bleu_chrf([long], [short])
    expected = (5 / 8 * 4 / 7 * 3 / 6 * 2 / 5) ** 0.25
    assert swapped["bleu"] == pytest.approx(100 * expected, abs=1e-6)
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert "nc:6" in got["chrf_signature"]


def test_chrf_weights_recall_twice_as_much_as_precision():
    # chrF (beta 2), the orders with n-grams on both sides averaged:
    # "ab" vs "abc": 1-grams P 1, R 2/3; 2-grams P 1, R 1/2 -> P 1, R 7/12
    p, r = 1.0, 7 / 12
    assert bleu_chrf(["ab"], ["abc"])["chrf"] == pytest.approx(100 * 5 * p * r / (4 * p + r))
    p, r = r, p  # swapped: precision and recall trade places, the score rises
    assert bleu_chrf(["abc"], ["ab"])["chrf"] == pytest.approx(100 * 5 * p * r / (4 * p + r))
    assert 100 * 5 * p * r / (4 * p + r) == pytest.approx(87.5)


def test_rouge_with_stemming_and_several_references():
    # Porter stems: cats -> cat, running/runs -> run. pred [the cat were run], ref [the cat run]
    got = rouge(["The cats were running"], ["the cat runs"])
    assert got["rouge1"] == pytest.approx(100 * 6 / 7)  # P 3/4, R 1
    assert got["rouge2"] == pytest.approx(100 * 0.4)  # bigrams: P 1/3, R 1/2
    assert got["rougeL"] == pytest.approx(100 * 6 / 7)  # LCS 3
    # several references: the best one per example (here the exact one), then the mean
    two = rouge(["the cat runs", "a dog"], [["a dog barks", "the cat runs"], ["cat"]])
    assert two["rouge1"] == pytest.approx(100 * (1.0 + 0.0) / 2)
