"""Answer normalisation and per-task metrics (torchmetrics, so they sync across processes)."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from torchmetrics import Metric

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (VQA-style normalisation)."""
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between normalised answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class MeanScore(Metric):
    """Mean of per-example scores (accuracy or F1), summed across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        """Add a vector of per-example scores."""
        scores = scores.detach().to(torch.float64).flatten()
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        """The mean, or NaN with no examples."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()
