"""Deciding on the device which frames deserve a human: scores, novelty, calibration, budgets, specs."""

from trigger.budget import Budget, TokenBucket
from trigger.calibrate import RateCalibrator
from trigger.dedup import NearDuplicateFilter, dhash, hamming
from trigger.disagreement import challenger_disagreement, human_disagreement
from trigger.evaluate import Evaluator
from trigger.frames import Decision, FrameBatch, Scores
from trigger.novelty import NoveltyBank
from trigger.scores import bald, energy, entropy, least_confidence, margin, softmax, variation_ratio
from trigger.spec import Spec, SpecError, parse_spec
from trigger.triggers import TRIGGERS, TriggerDef

__all__ = [
    "TRIGGERS", "Budget", "Decision", "Evaluator", "FrameBatch", "NearDuplicateFilter", "NoveltyBank",
    "RateCalibrator", "Scores", "Spec", "SpecError", "TokenBucket", "TriggerDef", "bald", "challenger_disagreement",
    "dhash", "energy", "entropy", "hamming", "human_disagreement", "least_confidence", "margin",
    "parse_spec", "softmax", "variation_ratio",
]
