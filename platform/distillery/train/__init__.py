"""Ray Train: the per-worker loop shared by every training method, the objective protocol, and supervised fine-tuning."""
