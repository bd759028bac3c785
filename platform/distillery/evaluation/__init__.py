"""Evaluation: task metrics, generation (vLLM or HF), teacher agreement, and the comparison report."""
