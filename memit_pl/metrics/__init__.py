"""Evaluation metrics (torchmetrics) and their pure functional cores."""

from memit_pl.metrics.counterfact import KINDS, EditingScore, PromptMagnitude, PromptSuccess
from memit_pl.metrics.generation import GenerationEntropy, ReferenceData, ReferenceScore
from memit_pl.metrics.zsre import TokenAccuracy

__all__ = [
    "KINDS",
    "EditingScore",
    "GenerationEntropy",
    "PromptMagnitude",
    "PromptSuccess",
    "ReferenceData",
    "ReferenceScore",
    "TokenAccuracy",
]
