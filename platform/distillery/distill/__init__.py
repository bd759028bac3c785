"""Distillation: KD losses, the distillation objective (online or cached teacher), the offline teacher cache and the `distill` method."""
