"""Text and token data shared by calibration, evaluation and distillation."""
