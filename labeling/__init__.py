"""The labeling bridge: a Label Studio queue ordered by informativeness, labels back to the hub exactly once."""
