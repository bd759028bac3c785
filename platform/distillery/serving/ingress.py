"""The HTTP front door of `distillery serve`: API keys, OpenAI-format 4xx answers, fast overload rejections.

`DistilleryIngress` subclasses ray.serve.llm's OpenAI ingress (passed to `build_openai_app` as
`ingress_cls_config`) and adds only what that one lacks:

- API keys: without `Authorization: Bearer <key>` every route answers 401 before the body is read.
  The ingress holds only the key's SHA-256 digest, never the key. Serve's own health route
  (`/-/healthz`) is answered by the proxy and needs no key.
- Malformed JSON and wrong types: 400 naming the field (the stock answer names the input value).
- Unknown models, including unknown adapters `base:adapter`: 404 here, before any engine replica.
- Overload: when the engine deployment's queue is full, a fast 503 (or 429) with `Retry-After`
  instead of a 500.
- Bounds on what one request may cost: a body over `max_request_bytes` gets 413 before it is
  parsed; `n` over `max_n` or a prompt list over `max_prompts` get 400 before any engine sees them
  (prompt tokens are bounded on the engine side, where the tokenizer is: serving/server.py).

Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import sys
import time
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response

from ray.serve.exceptions import BackPressureError

from distillery import ray_compat as rc
from distillery.serving.probe import load_probe, passes
from distillery.serving.versions import DeployLog, Version, Window, choose, judge

VERSION_HEADER = "X-Distillery-Version"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


def openai_error(status_code: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response in OpenAI's format (the `openai` client raises the matching exception)."""
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status_code, "server_error"),
                      "param": param, "code": status_code}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key: what the ingress compares against."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyGuard:
    """ASGI wrapper that refuses HTTP requests without the right bearer token (401).

    It wraps the whole FastAPI app, so it answers before routing or body parsing: a request
    without a key learns nothing, not even whether its JSON was valid.
    """

    def __init__(self, app: Any, digest: str | None) -> None:
        self.app = app
        self.digest = digest

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.digest is not None:
            header = b""
            for name, value in scope.get("headers", []):
                if name.lower() == b"authorization":
                    header = value
                    break
            scheme, _, token = header.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()), self.digest):
                message = "missing or invalid API key: send the header `Authorization: Bearer <key>`"
                response = openai_error(401, message, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI wrapper that answers 413 to a request body over `limit` bytes: at once when its
    Content-Length says so, else (a chunked body) as soon as what arrived passes the limit. The
    body is read here, at most `limit` bytes held, and handed on whole to the app."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, scope, receive, send) -> None:
        message = f"request body is larger than the server's limit of {self.limit:,} bytes (serve.max_request_bytes)"
        await openai_error(413, message)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._too_large(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive):
    """An ASGI receive that returns `messages` first, then defers to `receive` (disconnects)."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON or does not fit the request schema, naming the field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return openai_error(400, f"request body is not valid JSON: {detail}")
    # loc is ("body", field, ...); union members add their type names after the field.
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = loc[0] if loc else None
    where = f"field '{field}'" if field else "request body"
    more = f" ({len(errors) - 1} more problem(s) in other fields)" if len(errors) > 1 else ""
    return openai_error(400, f"invalid {where}: {first.get('msg')} (at {'.'.join(loc) or 'body'}){more}", param=field)


class DistilleryIngress(rc.OpenAiIngress):
    """OpenAI ingress with API keys, local LoRA adapters in /v1/models, and clean 4xx/503 answers.

    Args (bound by `build_openai_app` through `ingress_extra_kwargs`):
        adapters: base model id -> {adapter name -> local adapter dir}; served as `base:adapter`.
        api_key_digest: SHA-256 digest of the API key, or None for no auth.
        overload_status: 503 or 429 for requests the engine deployment's queue cannot take.
        retry_after_s: value of the `Retry-After` header on those answers.
        max_request_bytes, max_n, max_prompts: the bounds on one request (serve.* of the same names).
        routes: served name -> its versions (dicts of `serving.versions.Version`'s fields).
        canary: serve.canary as a dict; deploy_log: its path; registry: the lineage registry's
            directory, where rollbacks and promotions are also recorded (None: not recorded there).
        probes: served name -> its quality probe (serve.models[].probe as a dict, file absolute).
    """

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, adapters=None,
                 api_key_digest: str | None = None, overload_status: int = 503, retry_after_s: int = 1,
                 max_request_bytes: int = 1 << 20, max_n: int = 8, max_prompts: int = 32,
                 routes: dict[str, list[dict]] | None = None, canary: dict | None = None,
                 deploy_log: str | None = None, registry: str | None = None, probes: dict[str, dict] | None = None,
                 **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._routes = {name: [Version(**v) for v in versions] for name, versions in (routes or {}).items()}
        self._canary = canary or {}
        self._log = DeployLog(deploy_log) if deploy_log and self._routes else None
        self._shadow_log = DeployLog(deploy_log + ".shadow.jsonl") if self._log is not None else None
        self._registry = registry
        self._probes = probes or {}
        self._probe_tasks: dict[str, asyncio.Task] = {}  # started with a name's first request
        self._weights = {name: {v.label: v.weight for v in vs} for name, vs in self._routes.items()}
        self._windows = {(name, v.label): Window(self._canary.get("window_s", 60.0)) for name, vs in self._routes.items() for v in vs}
        self._since = dict.fromkeys(self._routes, time.monotonic())  # when each name's traffic last changed
        self._log_checked = 0.0
        self._rng = random.Random()
        if self._log is not None:
            self._log.refresh()
            for name in self._routes:
                self._weights[name] = self._log.weights(name) or self._weights[name]
        self._adapters: dict[str, dict[str, str]] = {b: dict(a) for b, a in (adapters or {}).items()}
        self._api_key_digest = api_key_digest
        self._overload_status = overload_status
        self._retry_after_s = retry_after_s
        self._max_request_bytes = max_request_bytes
        self._max_n = max_n
        self._max_prompts = max_prompts

    # The three private hooks below are listed, with why, in ray_compat.INGRESS_PRIVATE_HOOKS.
    # Ray Serve hands each replica its FastAPI app through this hook, before the first request
    # and before Starlette builds its middleware stack, so the app can still be wrapped here.
    def _set_asgi_app(self, app) -> None:
        app.exception_handlers[RequestValidationError] = invalid_request
        # The key first: a caller without one learns nothing about sizes either.
        super()._set_asgi_app(ApiKeyGuard(BodyLimit(app, self._max_request_bytes), self._api_key_digest))

    async def _get_model_id(self, model: str | None) -> str:
        if model is not None and model.split(":", 1)[0] not in self._model_cards:
            raise rc.OpenAIHTTPException(404, f"model '{model}' does not exist; available: {self._all_ids()}",
                                      type="invalid_request_error")
        model_id = await super()._get_model_id(model)
        base, sep, name = model_id.partition(":")
        if sep and name not in self._adapters.get(base, {}):
            raise rc.OpenAIHTTPException(404, f"model '{model_id}' does not exist; available: {self._all_ids()}",
                                      type="invalid_request_error")
        return model_id

    def _all_ids(self) -> list[str]:
        return list(self._model_cards) + [f"{b}:{a}" for b, names in self._adapters.items() for a in names]

    async def model(self, model_id: str) -> rc.ModelCard | None:
        if model_id in self._routes:
            stable = next(v for v in self._routes[model_id] if v.role == "stable")
            card = await self.model(stable.model_id)
            return rc.ModelCard(id=model_id, object="model", owned_by=card.owned_by, permission=list(card.permission),
                                metadata={**card.metadata, "versions": {v.label: v.role for v in self._routes[model_id]}})
        card = await super().model(model_id)
        if card is not None:
            return card
        base, sep, name = model_id.partition(":")
        if sep and name in self._adapters.get(base, {}):
            base_card = self._model_cards[base]
            return rc.ModelCard(id=model_id, object="model", owned_by=base_card.owned_by,
                             permission=list(base_card.permission),
                             metadata={**base_card.metadata, "base_model_id": base})
        return None

    async def models(self) -> rc.ModelList:
        listing = await super().models()
        for model_id in self._all_ids():
            if ":" in model_id:
                listing.data.append(await self.model(model_id))
        for name in self._routes:
            listing.data.append(await self.model(name))
        return listing

    def _bounds_error(self, body) -> JSONResponse | None:
        """A 400 for `n` over max_n or a prompt list over max_prompts, else None."""
        n = getattr(body, "n", None) or 1
        if n > self._max_n:
            return openai_error(400, f"n is {n}; this server returns at most {self._max_n} completions per request (serve.max_n)", param="n")
        prompt = getattr(body, "prompt", None)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > self._max_prompts:
            return openai_error(400, f"prompt is a list of {len(prompt)} prompts; this server takes at most {self._max_prompts} "
                                     f"per request (serve.max_prompts)", param="prompt")
        return None

    # -- versions ---------------------------------------------------------------------------------

    def _sync_traffic(self) -> None:
        """Apply traffic changes other replicas or `distillery deploy` wrote (checked once a second)."""
        now = time.monotonic()
        if self._log is None or now - self._log_checked < 1.0:
            return
        self._log_checked = now
        for record in self._log.refresh():
            if record.get("name") in self._routes and "weights" in record:
                self._weights[record["name"]] = record["weights"]
                self._since[record["name"]] = now

    def _change_traffic(self, event: str, name: str, weights: dict[str, float], **detail: Any) -> None:
        """Shift `name`'s traffic to `weights` here, and record it for every replica and the registry."""
        self._weights[name] = weights
        self._since[name] = time.monotonic()
        if self._log is not None:
            self._log.append(event, name, weights, **detail)
            self._log.refresh()  # our own line: not applied a second time later
        print(f"serve: {event} of '{name}': traffic {weights} ({detail.get('reason', '')})", file=sys.stderr, flush=True)
        if self._registry:
            try:
                from distillery.registry.store import Registry

                Registry(self._registry).log_event(event, name, {"weights": weights, **detail})
            except Exception as e:  # noqa: BLE001 - the deploy log already holds the event
                print(f"serve: warning: could not record the {event} in the registry: {e}", file=sys.stderr, flush=True)

    def _check_canary(self, name: str) -> None:
        """Roll the canary back when it is worse than stable; promote it after a clean window."""
        versions, weights = self._routes[name], self._weights[name]
        canary = next((v for v in versions if v.role == "canary"), None)
        stable = next(v for v in versions if v.role == "stable")
        if canary is None or weights.get(canary.label, 0) <= 0 or weights.get(stable.label, 0) <= 0:
            return
        c = self._canary
        s_stats, c_stats = self._windows[(name, stable.label)].stats(), self._windows[(name, canary.label)].stats()
        reason = judge(s_stats, c_stats, c.get("min_requests", 20), c.get("max_error_rate_delta", 0.05), c.get("max_p95_ratio", 1.5))
        if reason:
            self._change_traffic("rollback", name, {stable.label: 1.0, canary.label: 0.0}, reason=reason,
                                 stable=s_stats, canary=c_stats, automatic=True)
            return
        after = c.get("auto_promote_after_s")
        if after and time.monotonic() - self._since[name] >= after and c_stats["requests"] >= c.get("min_requests", 20):
            self._change_traffic("promote", name, {stable.label: 0.0, canary.label: 1.0},
                                 reason=f"no rollback in {after:g} s", stable=s_stats, canary=c_stats, automatic=True)

    def _route(self, body, raw_request: Request | None) -> tuple[str, Version] | None:
        """For a versioned name: (name, the version that answers), with body.model rewritten to it."""
        name = getattr(body, "model", None)
        if name not in self._routes:
            return None
        self._sync_traffic()
        header = self._canary.get("sticky_header", "x-session-id")
        key = (raw_request.headers.get(header) if raw_request is not None else None) or getattr(body, "user", None)
        if name in self._probes and name not in self._probe_tasks:
            self._probe_tasks[name] = asyncio.get_running_loop().create_task(self._probe_loop(name))
        version = choose(self._routes[name], self._weights[name], key, self._rng)
        shadow = next((v for v in self._routes[name] if v.role == "shadow"), None)
        if shadow is not None and self._rng.random() < self._weights[name].get(shadow.label, 0.0):
            copy = body.model_copy(update={"model": shadow.model_id, "stream": False})
            asyncio.get_running_loop().create_task(self._shadow(name, shadow, copy))
        body.model = version.model_id
        return name, version

    async def _probe_loop(self, name: str) -> None:
        """Every `every_s`, while `name`'s canary takes traffic: both versions answer the probe
        prompts; a canary whose pass rate is more than `max_score_drop` below stable's is rolled back."""
        probe = self._probes[name]
        while True:
            await asyncio.sleep(probe["every_s"])
            self._sync_traffic()
            versions, weights = self._routes[name], self._weights[name]
            canary = next((v for v in versions if v.role == "canary"), None)
            stable = next(v for v in versions if v.role == "stable")
            if canary is None or weights.get(canary.label, 0) <= 0 or weights.get(stable.label, 0) <= 0:
                continue
            try:
                rows = load_probe(probe["file"])
                scores = {v.label: await self._probe_score(v, rows, probe["max_tokens"]) for v in (stable, canary)}
            except Exception as e:  # noqa: BLE001 - a broken probe file or round never takes the server down
                print(f"serve: warning: quality probe of '{name}' skipped: {e}", file=sys.stderr, flush=True)
                continue
            print(f"serve: quality probe of '{name}': {scores} on {len(rows)} prompts", file=sys.stderr, flush=True)
            drop = scores[stable.label] - scores[canary.label]
            if drop > probe["max_score_drop"] and self._weights[name].get(canary.label, 0) > 0:
                self._change_traffic("rollback", name, {stable.label: 1.0, canary.label: 0.0}, automatic=True, probe=scores,
                                     reason=f"quality probe: canary passed {scores[canary.label]:.0%} of {len(rows)} prompts, "
                                            f"stable {scores[stable.label]:.0%} (more than {probe['max_score_drop']:.0%} below)")

    async def _probe_score(self, version: Version, rows: list[tuple[str, str]], max_tokens: int) -> float:
        """The share of probe rows `version` answers (greedy, through the engine like any request)."""
        passed = 0
        for prompt, answer in rows:
            body = rc.CompletionRequest(model=version.model_id, prompt=prompt, max_tokens=max_tokens, temperature=0)
            response = await self._answer(body, "completions", None)
            if response.status_code == 200:
                text = json.loads(bytes(response.body))["choices"][0]["text"]
                passed += passes(text, answer)
        return passed / len(rows)

    async def _shadow(self, name: str, shadow: Version, body) -> None:
        """Run a copy of a request on the shadow version; its answer goes to `<deploy log>.shadow.jsonl`."""
        t0 = time.monotonic()
        try:
            call = "chat" if hasattr(body, "messages") else "completions"
            response = await super()._process_llm_request(body, call, None)
            ok, answer = response.status_code < 500, bytes(getattr(response, "body", b"")).decode("utf-8", "replace")
        except Exception as e:  # noqa: BLE001 - a shadow's failure never reaches a client
            ok, answer = False, f"{type(e).__name__}: {e}"
        self._windows[(name, shadow.label)].add(ok, time.monotonic() - t0)
        if self._shadow_log is not None:
            self._shadow_log.append("shadow", name, version=shadow.label, ok=ok,
                                    latency_s=round(time.monotonic() - t0, 4), answer=answer[:4000])

    async def _process_llm_request(self, body, call_method: str, raw_request: Request | None = None) -> Response:
        error = self._bounds_error(body)
        if error is not None:
            return error
        routed = self._route(body, raw_request)
        if routed is None:
            return await self._answer(body, call_method, raw_request)
        name, version = routed
        t0 = time.monotonic()
        ok = False
        try:
            response = await self._answer(body, call_method, raw_request)
            ok = response.status_code < 500
        finally:
            self._windows[(name, version.label)].add(ok, time.monotonic() - t0)
            self._check_canary(name)
        response.headers[VERSION_HEADER] = version.label
        return response

    async def _answer(self, body, call_method: str, raw_request: Request | None) -> Response:
        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except BackPressureError as e:
            return openai_error(self._overload_status, f"server overloaded, retry later: {e}",
                                headers={"Retry-After": str(self._retry_after_s)})
        except rc.OpenAIHTTPException as e:
            return openai_error(e.status_code, e.message)
        except HTTPException as e:
            return openai_error(e.status_code, str(e.detail))
