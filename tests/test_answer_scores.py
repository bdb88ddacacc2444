"""core/answer_scores.py: LLaMA-Factory's BLEU-4 / ROUGE numbers on a fixture, and the degeneration
figures on hand-made answers."""

from __future__ import annotations

import json

import pytest

from conftest import REPO_ROOT
from lorapipe.core import answer_scores as scores

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "answers"


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_similarity_is_llamafactorys_own_scoring_of_the_fixture():
    # lf_scores.json is the output of LLaMA-Factory's ComputeSimilarity (scripts/lf_similarity_reference.py)
    reference = json.loads((FIXTURE / "lf_scores.json").read_text(encoding="utf-8"))
    rows = fixture_rows()
    preds, labels = [r["predict"] for r in rows], [r["label"] for r in rows]
    assert scores.similarity(preds, labels) == reference["per_answer"]
    assert scores.mean_similarity(preds, labels) == reference["mean"]
    # the fixture covers what the scoring special-cases: an identical pair, an empty prediction, an empty label
    per = reference["per_answer"]
    assert per["bleu-4"][1] == per["rouge-l"][1] == 100.0
    assert per["rouge-1"][2] == per["bleu-4"][2] == 0 and per["rouge-1"][9] == 0


def test_distinct_counts_unique_ngrams_over_all_answers():
    answers = [[1, 2, 3], [1, 2, 4]]
    assert scores.distinct(answers, 1) == 4 / 6
    assert scores.distinct(answers, 2) == 3 / 4  # (1,2) twice, (2,3), (2,4)
    assert scores.distinct([[1], []], 2) == 0.0  # no bigram at all


def test_seq_rep_4_is_the_repeated_share_of_4grams_per_answer():
    looping = [7, 8, 7, 8, 7, 8, 7, 8]  # 5 four-grams, 2 unique
    fresh = [1, 2, 3, 4, 5]
    assert scores.seq_rep([looping], 4) == pytest.approx(1 - 2 / 5)
    assert scores.seq_rep([fresh], 4) == 0.0
    assert scores.seq_rep([looping, fresh, [1, 2]], 4) == pytest.approx((1 - 2 / 5) / 2)  # too short: not counted


def test_figures_count_cut_and_empty_answers_and_mean_length():
    fig = scores.figures(["a b", "", "c"], [[1, 2], [], [3]], [True, True, False])
    assert fig["cut"] == pytest.approx(1 / 3) and fig["empty"] == pytest.approx(1 / 3)
    assert fig["len"] == 1.0
    assert set(fig) == {"distinct1", "distinct2", "len", "seqrep4", "cut", "empty"}


def test_agreement_is_exact_share_and_bleu_against_the_other_answers():
    same = scores.agreement(["你好，很高兴认识你", "hello there"], ["你好，很高兴认识你", "hello there"])
    assert same == {"exact": 1.0, "bleu4": 100.0}
    half = scores.agreement(["你好，很高兴认识你", "bye"], ["你好，很高兴认识你", "hello there"])
    assert half["exact"] == 0.5 and 0 < half["bleu4"] < 100
