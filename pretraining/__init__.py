"""Pretraining scripts (data preparation and the training command); see README.md."""
