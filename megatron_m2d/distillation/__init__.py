"""Stage 4: distillation of the dense student from the MoE teacher (HF backend here)."""
