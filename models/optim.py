"""Optimisers, learning-rate schedules and training options of a trial."""
from __future__ import annotations

# Trial parameters of training, each with the check of one value and its default (search.space
# merges them into its TRIAL_PARAMS).
TRAINING_PARAMS: dict = {}
