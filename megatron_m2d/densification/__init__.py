"""Stage 2: scores -> plan -> dense weights. Never imports Megatron."""
