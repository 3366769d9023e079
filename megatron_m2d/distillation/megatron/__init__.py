"""Distillation at pretraining scale on Megatron-Core (imports megatron-core; the offline tool never imports this)."""
