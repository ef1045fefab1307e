"""The HTTP face of `persllm serve`: `create_app` builds the FastAPI app over a `BatchEngine`
(`/health`, `/v1/models`, `/v1/chat/completions` plain and as server-sent events), with OpenAI-style
error bodies and usage counts, and the chat page at `/` (static files in ui/, served by the app
itself, and `/ui/personas`, the personas the page offers)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from persllm_jax.inference.serving.engine import BatchEngine, Job
from persllm_jax.inference.serving.protocol import RequestError, parse_request

UI_FILES = Path(__file__).parent / "ui"
_PAGE_FILES = {"/": "index.html", "/ui/chat.js": "chat.js", "/ui/chat.css": "chat.css"}


def personas_for_page(personas_dir: Path) -> list[dict]:
    """The personas of a folder as the chat page shows them: each stage with its system prompt."""
    from persllm_jax.personas.materials import load_personas
    from persllm_jax.personas.prompts import system_prompt

    return [
        {
            "id": persona.id,
            "name": persona.name,
            "stages": [
                {"id": stage.id, "when": stage.when, "system_prompt": system_prompt(persona, stage)}
                for stage in persona.stages
            ],
        }
        for persona in load_personas(personas_dir)
    ]


def _error_response(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def create_app(
    engine: BatchEngine,
    model_name: str,
    aliases: Sequence[str] = (),
    *,
    api_key: str | None = None,
    docs: bool = False,
    personas_dir: Path | None = None,
):
    """The FastAPI app. `model_name` is the id clients see; `aliases` (the model path) are accepted
    too. With `api_key`, every route but /health and the chat page's static files needs
    `Authorization: Bearer <api_key>` (the page asks for the key); `docs` serves the interactive
    /docs pages and the OpenAPI schema; `personas_dir` turns the chat page on, offering the
    personas of that folder."""
    app = FastAPI(
        title="persllm serve",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    created = int(time.time())
    accepted = {model_name, *aliases}

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            public = request.url.path == "/health" or (personas_dir and request.url.path in _PAGE_FILES)
            if not public and not hmac.compare_digest(given, expected):
                return _error_response(
                    RequestError(
                        401,
                        "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                        type="invalid_request_error",
                        code="invalid_api_key",
                    )
                )
            return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(RequestError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return _error_response(RequestError(400, str(exc)))

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": model_name}

    if personas_dir is not None:
        page_personas = personas_for_page(personas_dir)

        @app.get("/", include_in_schema=False)
        @app.get("/ui/chat.js", include_in_schema=False)
        @app.get("/ui/chat.css", include_in_schema=False)
        async def page(request: Request):
            return FileResponse(
                UI_FILES / _PAGE_FILES[request.url.path], headers={"Cache-Control": "no-cache"}
            )

        @app.get("/ui/personas", include_in_schema=False)
        async def ui_personas():
            return {"model": model_name, "personas_dir": str(personas_dir), "personas": page_personas}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "persllm"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in accepted:
            return _error_response(_unknown_model(model_id, model_name))
        return {"id": model_name, "object": "model", "created": created, "owned_by": "persllm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the request body is not valid JSON: {err}") from err
            if isinstance(body, dict) and body.get("model") not in (None, *accepted):
                raise _unknown_model(body["model"], model_name)
            chat = parse_request(body)
            job = await engine.submit(chat)
        except RequestError as err:
            return _error_response(err)
        try:
            first = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if first[0] == "error":
            return _error_response(first[1])
        prompt_tokens = first[1]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if chat.stream:
            return StreamingResponse(
                _stream(job, completion_id, now, model_name, prompt_tokens),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    return _error_response(event[1])
                if event[0] == "done":
                    break
        finally:
            job.cancelled = True  # harmless once done; skips the job if the client went away first
        completion = event[1]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(completion),
        }

    return app


def _unknown_model(asked: Any, served: str) -> RequestError:
    return RequestError(
        404,
        f"The model {asked!r} does not exist on this server; it serves {served!r}",
        param="model",
        code="model_not_found",
    )


def _usage(completion) -> dict:
    generated = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
    }


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(
    job: Job, completion_id: str, created: int, model_name: str, prompt_tokens: int
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                # OpenAI's clients raise an APIError for an event that carries "error".
                yield _sse(event[1].body())
                break
            elif event[0] == "done":
                completion = event[1]
                yield chunk({}, completion.finish_reason)
                if job.request.include_usage:
                    usage = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage(completion),
                    }
                    yield _sse(usage)
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled = True
