"""Stage 3: HF <-> Megatron-Core conversion (imports megatron-core; the offline tool never does)."""
