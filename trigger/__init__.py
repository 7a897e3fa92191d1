"""Deciding on the device which frames deserve a human: scores, novelty, calibration, budgets, specs."""
