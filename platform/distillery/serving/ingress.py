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

Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response

from ray.serve.exceptions import BackPressureError

from distillery import ray_compat as rc

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "overloaded_error"}


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
    """

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, adapters=None,
                 api_key_digest: str | None = None, overload_status: int = 503, retry_after_s: int = 1, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._adapters: dict[str, dict[str, str]] = {b: dict(a) for b, a in (adapters or {}).items()}
        self._api_key_digest = api_key_digest
        self._overload_status = overload_status
        self._retry_after_s = retry_after_s

    # The three private hooks below are listed, with why, in ray_compat.INGRESS_PRIVATE_HOOKS.
    # Ray Serve hands each replica its FastAPI app through this hook, before the first request
    # and before Starlette builds its middleware stack, so the app can still be wrapped here.
    def _set_asgi_app(self, app) -> None:
        app.exception_handlers[RequestValidationError] = invalid_request
        super()._set_asgi_app(ApiKeyGuard(app, self._api_key_digest))

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
        return listing

    async def _process_llm_request(self, body, call_method: str, raw_request: Request | None = None) -> Response:
        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except BackPressureError as e:
            return openai_error(self._overload_status, f"server overloaded, retry later: {e}",
                                headers={"Retry-After": str(self._retry_after_s)})
        except rc.OpenAIHTTPException as e:
            return openai_error(e.status_code, e.message)
        except HTTPException as e:
            return openai_error(e.status_code, str(e.detail))
