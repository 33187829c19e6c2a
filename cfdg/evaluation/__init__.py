"""Evaluation: feature extractors, FID / IS / precision / recall, and the guidance sweep."""

from cfdg.evaluation.extractor import (
    Evaluator,
    EvaluatorConfig,
    load_evaluator,
    train_evaluator,
)
from cfdg.evaluation.metrics import (
    evaluate_images,
    frechet_distance,
    inception_score,
    precision_recall,
)
from cfdg.evaluation.reference import ReferenceStats, reference_stats
from cfdg.evaluation.sweep import SweepConfig, run_sweep

__all__ = [
    "Evaluator",
    "EvaluatorConfig",
    "ReferenceStats",
    "SweepConfig",
    "evaluate_images",
    "frechet_distance",
    "inception_score",
    "load_evaluator",
    "precision_recall",
    "reference_stats",
    "run_sweep",
    "train_evaluator",
]
