"""Scores of generated answers: LLaMA-Factory's BLEU-4 / ROUGE-1/2/L and degeneration figures.

`similarity` is LLaMA-Factory's `ComputeSimilarity` (src/llamafactory/train/sft/metric.py, the same
in llamafactory 0.9.5 and at hiyouga/LLaMA-Factory commit 158f4cb57744439811013639661ebd103e07d742)
applied to decoded text: per answer, jieba words joined by spaces scored by `rouge_chinese.Rouge`
(F of ROUGE-1/2/L; 0 when either side has no word), character-level `nltk` `sentence_bleu` with
`SmoothingFunction().method3` for BLEU-4, each × 100 rounded to 4 places, then the plain mean. It
calls the same packages at the versions pinned in requirements.txt, so the numbers are
LLaMA-Factory's (tests/test_answer_scores.py checks them against its own code's output).

The other figures count n-grams of model tokens (one tokenizer for answers and references):
distinct-n (Li et al. 2016) is corpus-level unique n-grams / all n-grams; seq-rep-4 (Welleck et al.
2019) is per answer 1 − unique 4-grams / 4-grams, averaged over the answers that have a 4-gram.
"""

from __future__ import annotations

import logging

import numpy as np


def _jieba():
    import jieba

    # jieba logs its dictionary loading at DEBUG on its own stderr handler; its dictionary cache goes
    # to tempfile.gettempdir()/jieba.cache (jieba's default), rebuilt when missing.
    jieba.setLogLevel(logging.WARNING)
    return jieba


def similarity(preds: list[str], labels: list[str]) -> dict[str, list[float]]:
    """Per-answer scores, LLaMA-Factory's ComputeSimilarity loop: {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    scores: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels, strict=True):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            scores[k].append(round(v["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return scores


def mean_similarity(preds: list[str], labels: list[str]) -> dict[str, float]:
    """LLaMA-Factory's figures: the mean of each per-answer score (`predict_<name>` in its predict_results.json)."""
    return {k: float(np.mean(v)) for k, v in similarity(preds, labels).items()}


def _ngrams(tokens: list, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(token_lists: list[list], n: int) -> float:
    """Unique n-grams / n-grams over all answers together; 0 when there is no n-gram."""
    grams = [g for tokens in token_lists for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def seq_rep(token_lists: list[list], n: int = 4) -> float:
    """Mean over answers with at least one n-gram of 1 - unique n-grams / n-grams; 0 when none has one."""
    reps = [1 - len(set(g)) / len(g) for g in (_ngrams(t, n) for t in token_lists) if g]
    return float(np.mean(reps)) if reps else 0.0


def figures(answers: list[str], token_lists: list[list], stopped: list[bool]) -> dict[str, float]:
    """Degeneration figures of one variant's answers (token_lists: each answer in model tokens)."""
    n = len(answers)
    return {
        **text_figures(token_lists),
        "cut": sum(not s for s in stopped) / n,  # hit max_new_tokens without ending its turn
        "empty": sum(not a.strip() for a in answers) / n,
    }


def text_figures(token_lists: list[list]) -> dict[str, float]:
    """The figures a reference text has too: distinct-1/2, mean length in tokens, seq-rep-4."""
    return {"distinct1": distinct(token_lists, 1), "distinct2": distinct(token_lists, 2),
            "len": float(np.mean([len(t) for t in token_lists])), "seqrep4": seq_rep(token_lists, 4)}


def agreement(answers: list[str], others: list[str]) -> dict[str, float]:
    """How far one variant's answers match another's: exact-match share and LLaMA-Factory's BLEU-4 of
    `answers` against `others` as references."""
    exact = sum(a == b for a, b in zip(answers, others, strict=True)) / len(answers)
    return {"exact": exact, "bleu4": mean_similarity(answers, others)["bleu-4"]}
