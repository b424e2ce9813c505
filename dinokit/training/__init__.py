"""Training machinery beside the loop (engine.py): learning-rate schedules, the frozen-feature cache."""
