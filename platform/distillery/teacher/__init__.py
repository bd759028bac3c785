"""Offline teacher cache: the teacher's top-k logprobs computed once (Ray Data batch inference), reused by every distillation run."""
