"""The engine side of `distillery serve`: Ray's LLM server (one vLLM engine per replica) with
local LoRA adapters, prompt-length checks and latency-target admission. Runs inside the engine
replicas, not the driver.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import HTTPException

from distillery import ray_compat as rc
from distillery.serving.admission import AdmissionControl, Ticket

ADAPTERS_KEY = "distillery_adapters"  # LLMConfig.experimental_configs key: adapter name -> local dir
MAX_LEN_KEY = "distillery_max_model_len"  # LLMConfig.experimental_configs key: context length in tokens
MAX_PROMPT_KEY = "distillery_max_prompt_tokens"  # LLMConfig.experimental_configs key: serve.max_prompt_tokens


class LocalAdapterLoader(rc.LoraModelLoader):
    """Resolves `base:adapter` to a local PEFT directory (Ray's loader only reads cloud storage)."""

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> rc.DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        name = lora_model_id.split(":", 1)[1] if ":" in lora_model_id else ""
        path = llm_config.experimental_configs.get(ADAPTERS_KEY, {}).get(name)
        if path is None:
            raise HTTPException(404, f"model '{lora_model_id}' does not exist")
        disk = rc.DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=None, local_path=path,
                                      lora_assigned_int_id=rc.global_id_manager.next())
        self.disk_cache[lora_model_id] = disk
        return disk


class DistilleryLLMServer(rc.LLMServer):
    """Ray's LLM server (the engine replica), plus local LoRA adapters and a context-length check.

    vLLM silently shortens `max_tokens` when prompt + max_tokens exceed the context; a client
    asking for more than fits gets a 400 here instead, before the request is scheduled.
    """

    async def __init__(self, llm_config, *, engine_cls=None, model_downloader=None):
        await super().__init__(llm_config, engine_cls=engine_cls,
                               model_downloader=model_downloader or LocalAdapterLoader)
        self._tokenizer = None
        self._dropped_streams = 0
        self._admission: AdmissionControl | None = None  # set by `reconfigure` (Serve's user_config)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's live settings (the deployment's `user_config`), applied without a restart:
        `max_admitted` (requests the engine works on at once), `latency_target_ms` (null: that
        number is fixed; else the p95 target the admission controller steers it to) and
        `latency_metric` (`tpot` or `ttft`)."""
        unknown = set(user_config) - {"max_admitted", "latency_target_ms", "latency_metric"}
        if unknown:
            raise ValueError(f"user_config: unknown key(s) {sorted(unknown)}")
        target_ms = user_config.get("latency_target_ms")
        target_s = target_ms / 1000 if target_ms else None
        metric = user_config.get("latency_metric", "tpot")
        limit = int(user_config.get("max_admitted") or self._llm_config.engine_kwargs.get("max_num_seqs", 256))
        if self._admission is None:
            self._admission = AdmissionControl(limit, target_s, metric)
        else:
            self._admission.set_target(target_s, metric, limit)

    def _prompt_tokens(self, request) -> int:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._llm_config.model_loading_config.model_source)
        tok = self._tokenizer
        messages = getattr(request, "messages", None)
        if messages is not None:
            plain = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
            ids = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
            return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        prompt = request.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        return max((len(p) if not isinstance(p, str) else len(tok(p)["input_ids"])) for p in prompts or [""])

    async def _context_error(self, request):
        """An ErrorResponse (400) when a prompt is over serve.max_prompt_tokens or prompt + max_tokens
        exceed the context, else None. Tokenising takes milliseconds per long prompt: it runs in a
        thread so the replica's event loop keeps streaming other requests meanwhile."""
        configs = self._llm_config.experimental_configs
        limit, prompt_limit = configs.get(MAX_LEN_KEY), configs.get(MAX_PROMPT_KEY)
        wanted = getattr(request, "max_completion_tokens", None) or request.max_tokens
        if not prompt_limit and not (limit and wanted):
            return None
        try:
            n = await asyncio.to_thread(self._prompt_tokens, request)
        except Exception:  # noqa: BLE001 - an unusual prompt shape is left to vLLM's own checks
            return None
        if prompt_limit and n > prompt_limit:
            message = f"prompt is {n} tokens; this server takes at most {prompt_limit} (serve.max_prompt_tokens)"
            return rc.ErrorResponse(error=rc.ErrorInfo(message=message, type="invalid_request_error", param="prompt", code=400))
        if not (limit and wanted) or n + wanted <= limit:
            return None
        message = (f"prompt ({n} tokens) plus max_tokens ({wanted}) exceeds the model's context of {limit} "
                   f"tokens; shorten the prompt or lower max_tokens")
        return rc.ErrorResponse(error=rc.ErrorInfo(message=message, type="invalid_request_error", param="max_tokens", code=400))

    async def chat(self, request, raw_request_info=None):
        return await self._run(request, raw_request_info, super().chat)

    async def completions(self, request, raw_request_info=None):
        return await self._run(request, raw_request_info, super().completions)

    async def _run(self, request, raw_request_info, method):
        error = await self._context_error(request)
        if error:
            return _once(error)
        # Waiting for admission happens before the engine sees the request: a client that hangs
        # up meanwhile is cancelled here and never costs an engine step.
        ticket = await self._admission.acquire() if self._admission else None
        try:
            stream = await method(request, raw_request_info)
        except BaseException:
            if ticket is not None:
                self._admission.release(ticket)
            raise
        return self._watched(stream, ticket, getattr(request, "n", None) or 1)

    async def _watched(self, stream, ticket: Ticket | None = None, n: int = 1):
        """`stream`, counting the ones that end before their last item: a client that hung up makes
        Serve cancel this generator, and closing the engine's generator here aborts the request in
        vLLM at once, freeing its batch slot and KV cache. With admission on, the request's
        latency goes to the controller as it streams (`_Meter`)."""
        finished = False
        meter = _Meter(self._admission, ticket, n) if ticket is not None else None
        try:
            async for item in stream:
                if meter is not None:
                    meter.saw(item)
                yield item
            finished = True
            if meter is not None:
                meter.end()
        finally:
            if not finished:
                self._dropped_streams += 1
                await stream.aclose()
            if ticket is not None:
                self._admission.release(ticket)

    async def engine_load(self) -> dict[str, Any]:
        """{replica, running: requests the engine holds (running or waiting), dropped_streams:
        responses that ended before their last chunk, admission: the controller's state or None}."""
        from ray import serve

        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "running": rc.engine_unfinished_requests(self.engine), "dropped_streams": self._dropped_streams,
                "admission": self._admission.stats() if self._admission else None}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the admission state (`serving.autoscale` reads it)."""
        return self._admission.stats() if self._admission else {}


class _Meter:
    """Measures one admitted request for the admission controller while it streams.

    `ttft`: admission to the first streamed chunk (a non-streamed response: to the whole answer).
    `tpot`: time per output token of each sequence, over stretches of at least `SPAN_S` (Ray
    batches stream chunks every 50 ms; a longer stretch keeps that rounding small), from the first
    chunk on; a request shorter than one stretch reports its whole stream at its end.
    """

    SPAN_S = 0.5

    def __init__(self, admission: AdmissionControl, ticket: Ticket, n: int):
        self.admission, self.ticket, self.n = admission, ticket, n
        self.span_start: float | None = None  # the current stretch began at this chunk
        self.span_tokens = 0.0  # tokens per sequence since then
        self.reported = False

    def saw(self, item) -> None:
        now = time.monotonic()
        a = self.admission
        if not isinstance(item, list):  # a whole (non-streamed) response
            usage = getattr(item, "usage", None)
            if usage is not None:
                latency = now - self.ticket.admitted_at
                tokens = max(usage.completion_tokens / self.n, 1)
                a.observe(latency if a.metric == "ttft" else latency / tokens, self.ticket.admitted_at)
                self.reported = True
            return
        if self.span_start is None:
            self.span_start = now
            if a.metric == "ttft":
                a.observe(now - self.ticket.admitted_at, self.ticket.admitted_at)
                self.reported = True
            return
        self.span_tokens += sum(1 for chunk in item if isinstance(chunk, str) and chunk.startswith("data: ")
                                and "[DONE]" not in chunk) / self.n
        if a.metric == "tpot" and now - self.span_start >= self.SPAN_S and self.span_tokens >= 1:
            a.observe((now - self.span_start) / self.span_tokens, self.span_start)
            self.span_start, self.span_tokens, self.reported = now, 0.0, True

    def end(self) -> None:
        if not self.reported and self.admission.metric == "tpot" and self.span_start is not None and self.span_tokens >= 1:
            self.admission.observe((time.monotonic() - self.span_start) / self.span_tokens, self.span_start)


async def _once(item):
    yield item
