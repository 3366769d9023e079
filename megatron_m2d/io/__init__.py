"""Checkpoint reading and writing (safetensors only), shared by every stage."""
