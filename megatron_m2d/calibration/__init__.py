"""Stage 1: stream a HF MoE checkpoint over calibration text and record routing statistics."""
