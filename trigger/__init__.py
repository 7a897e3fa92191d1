"""Deciding on the device which frames deserve a human: scores, novelty, calibration, budgets, specs."""

from trigger.box_scores import (
    BoxComparison,
    ambiguous_boxes,
    box_disagreement,
    box_flicker,
    box_instability,
    box_uncertainty,
    localization_stability,
)
from trigger.boxes import Boxes, box_iou, match_boxes
from trigger.budget import Budget, TokenBucket
from trigger.calibrate import RateCalibrator
from trigger.dedup import NearDuplicateFilter, dhash, hamming
from trigger.disagreement import challenger_disagreement, human_disagreement
from trigger.evaluate import Evaluator
from trigger.frames import Decision, FrameBatch, Scores
from trigger.nms import batched_nms, decode_dense
from trigger.novelty import NoveltyBank, sample_rows
from trigger.scores import bald, energy, entropy, least_confidence, margin, softmax, variation_ratio
from trigger.spec import Spec, SpecError, parse_spec
from trigger.triggers import TRIGGERS, TriggerDef

__all__ = [
    "TRIGGERS", "BoxComparison", "Boxes", "Budget", "Decision", "Evaluator", "FrameBatch", "NearDuplicateFilter",
    "NoveltyBank", "RateCalibrator", "Scores", "Spec", "SpecError", "TokenBucket", "TriggerDef", "ambiguous_boxes",
    "bald", "batched_nms", "box_disagreement", "box_flicker", "box_instability", "box_iou", "box_uncertainty",
    "challenger_disagreement", "decode_dense", "dhash", "energy", "entropy", "hamming", "human_disagreement",
    "least_confidence", "localization_stability", "margin", "match_boxes", "parse_spec", "sample_rows", "softmax",
    "variation_ratio",
]
