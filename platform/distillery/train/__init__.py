"""Ray Train per-worker loops: finetune (SFT) and distill (teacher -> student)."""
