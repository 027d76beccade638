"""The HTTP routes of ``lmlab serve``: OpenAI-compatible shapes, lmlab's own endpoints, errors.

    app = create_app(model, tokenizer, "demo", api_key=None, max_batch=16)
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: serve("runs/demo/best", port=8000)

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(models whose tokenizer has a chat template), ``POST /v1/score``, ``POST /v1/next-token``,
``POST /v1/attention`` (transformers) and the playground at ``GET /``. Sampling and greedy
requests go through the continuous-batching ``Scheduler``; everything else that reads the
model (beam search, scoring, echo log-probabilities) runs on the scheduler's thread between
two steps. Decoding options become a ``DecodingSetup``, so a request decodes exactly as
``lmlab generate`` with the same options and seed.

Bad requests get HTTP 400 with an OpenAI-style body naming the field
(``{"error": {"message", "type", "param", "code"}}``); a wrong or missing key 401;
a body over ``max_body_bytes`` 413, refused before it is parsed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import math
import time
import uuid
from importlib import resources
from numbers import Integral, Real
from typing import Any, AsyncIterator, Callable

import torch

from lmlab.decode.generate import StreamedRow
from lmlab.decode.setups import DecodingSetup, run_setup, special_ids_to_suppress
from lmlab.serve.scheduler import Job, Scheduler, TokenEvent, states_merge
from lmlab.tokenizers import text_offsets

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lmlab serve needs the optional packages fastapi and uvicorn: pip install 'lmlab[serve]'") from e

__all__ = ["create_app", "serve", "serving_model", "APIError", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
MAX_LOGPROBS = 20
# OpenAI completion fields, then lmlab's decoding options accepted as extra fields (as vLLM does).
_SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop",
                    "n", "stream", "stream_options", "user")
_EXTRA_FIELDS = ("top_k", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
                 "length_penalty", "min_tokens", "add_bos")
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "logprobs", "echo", "best_of", "suffix",
                     *_SAMPLING_FIELDS, *_EXTRA_FIELDS)
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
               *_SAMPLING_FIELDS, *_EXTRA_FIELDS)


class APIError(Exception):
    """An error the client gets as ``{"error": {...}}`` with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------- field checks


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise APIError(f"{name} must be an integer, got {value!r}", name)
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(f"{name} must be an integer {bounds}, got {value}", name)
    return int(value)


def _real(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise APIError(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values) or len(values) > 4:
        raise APIError(f"stop must be a non-empty string or a list of up to 4 of them, got {value!r}", "stop")
    return values


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(f"logit_bias must be an object mapping token ids to biases, got {value!r}", "logit_bias")
    out = {}
    for k, v in value.items():
        try:
            token = int(k)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise APIError(f"logit_bias key {token} is outside the vocabulary 0..{vocab_size - 1}", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, Real) or math.isnan(v) or v == math.inf:
            raise APIError(f"logit_bias[{k}] must be a number (or -100 to ban), got {v!r}", "logit_bias")
        out[token] = float(v)
    return out


def _unknown(body: dict, accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(accepted))
    if unknown:
        raise APIError(f"unrecognized request argument(s) {unknown}; accepted: {', '.join(accepted)}", unknown[0])


def _setup(body: dict, vocab_size: int) -> DecodingSetup:
    """The DecodingSetup of a request's decoding fields (ValueError from the setup -> 400 naming the field)."""
    values: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "length_penalty"):
        v = _real(body, name)
        if v is not None:
            values[name] = v
    for name, lo in (("top_k", 1), ("no_repeat_ngram_size", 0), ("num_beams", 1), ("min_tokens", 0)):
        v = _int(body, name, None, lo)
        if v is not None:
            values["min_new_tokens" if name == "min_tokens" else name] = v
    if values.get("top_k") is not None and values["top_k"] > vocab_size:
        raise APIError(f"top_k={values['top_k']} is larger than the vocabulary size {vocab_size}", "top_k")
    bias = _logit_bias(body, vocab_size)
    if bias:
        values["logit_bias"] = bias
    values["num_return_sequences"] = _int(body, "n", 1, 1)
    try:
        return DecodingSetup(**values)
    except ValueError as e:
        message = str(e)
        fields = [f for f in (*values, "n", "num_return_sequences", "do_sample") if f in message]
        param = fields[0] if fields else None
        raise APIError(message, "n" if param == "num_return_sequences" else param) from None


# ---------------------------------------------------------------- the app


class _Server:
    """What the routes share: the model, its tokenizer, the scheduler and the limits."""

    def __init__(self, model, tokenizer, name: str, max_batch: int, max_tokens_limit: int | None,
                 decoding_process: bool | None, decoding_threads: int | None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        if decoding_process is None:
            decoding_process = states_merge(model)
        self._woken: collections.deque[_Inbox] = collections.deque()  # inboxes with news since the last delivery
        self._delivery_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        if decoding_process:
            from lmlab.serve.worker import WorkerScheduler

            self.scheduler = WorkerScheduler(model, tokenizer, max_batch=max_batch, threads=decoding_threads,
                                             on_iteration=self._deliver_soon)
        else:
            self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, on_iteration=self._deliver_soon)
        self.context = model.max_context
        self.max_tokens_limit = max_tokens_limit or self.context or 4096
        self.created = int(time.time())
        self.eos_id = getattr(tokenizer, "eos_id", None)

    # ------------------------------------------------------------ shared pieces

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.name:
            raise APIError(f"model {name!r} does not exist; this server serves {self.name!r}", "model", 404,
                           code="model_not_found")

    def encode_prompts(self, value, add_bos: bool) -> list[list[int]]:
        """prompt: a string, a list of strings, a list of token ids or a list of id lists."""
        bad = APIError(f"prompt must be a string, a list of strings or a list of token-id lists, got {value!r}"[:300], "prompt")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise bad
        if all(isinstance(t, Integral) and not isinstance(t, bool) for t in value):
            value = [value]
        prompts = []
        V = int(self.model.vocab_size)
        for p in value:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            elif isinstance(p, list) and all(isinstance(t, Integral) and not isinstance(t, bool) for t in p):
                ids = [int(t) for t in p]
                if any(not 0 <= t < V for t in ids):
                    raise APIError(f"prompt holds a token id outside the vocabulary 0..{V - 1}", "prompt")
            else:
                raise bad
            if add_bos:
                ids = [self.tokenizer.bos_id] + ids
            if not ids:
                raise APIError("prompt is empty; give at least one token (or add_bos: true for models trained on "
                               "complete sequences)", "prompt")
            prompts.append(ids)
        return prompts

    def check_lengths(self, prompts: list[list[int]], max_tokens: int, n: int) -> None:
        if max_tokens > self.max_tokens_limit:
            raise APIError(f"max_tokens={max_tokens} is over this server's limit of {self.max_tokens_limit}", "max_tokens")
        if n * max(max_tokens, 1) > self.max_tokens_limit:
            raise APIError(f"n x max_tokens = {n} x {max_tokens} is over this server's limit of "
                           f"{self.max_tokens_limit} tokens per request", "n")
        if n > self.scheduler.max_batch:
            raise APIError(f"n={n} is more than the batch of {self.scheduler.max_batch} rows this server runs", "n")
        if self.context is None:
            return
        for p in prompts:
            if len(p) > self.context:
                raise APIError(f"the prompt has {len(p)} tokens, more than the model's context of {self.context}",
                               "prompt")
            if len(p) + max_tokens - 1 > self.context:
                raise APIError(f"the prompt ({len(p)} tokens) + max_tokens={max_tokens} need more than the model's "
                               f"context of {self.context}; accepted: max_tokens <= {self.context - len(p) + 1}",
                               "max_tokens")

    def processors(self, setup: DecodingSetup) -> list:
        V = int(self.model.vocab_size)
        specials = special_ids_to_suppress(setup.suppress_specials, self.tokenizer, V, self.eos_id)
        return setup.processors(eos_id=self.eos_id, special_ids=specials)

    def token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def token_bytes(self, token: int) -> list[int]:
        """The chat API's ``bytes`` of ``token``: what it adds to a text, part of a character included."""
        found = self._token_bytes.get(token)
        if found is None:
            found = self._token_bytes[token] = list(self.tokenizer.token_bytes(token))
        return found

    # ------------------------------------------------------------ streamed events

    def bind_loop(self) -> None:
        """Before each submit or call, on the event loop: the decoding process's messages are read
        by the running loop itself (``WorkerScheduler.read_on``), one wake-up per pass of the
        decoding loop instead of a reader thread's and then the loop's."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            read_on = getattr(self.scheduler, "read_on", None)
            if read_on is not None:
                read_on(loop)

    def submit(self, job: Job) -> None:
        self.bind_loop()
        self.scheduler.submit(job)

    def inbox(self) -> "_Inbox":
        """An inbox for one streaming request's events (made on the event loop's thread)."""
        self.bind_loop()
        return _Inbox()

    def post(self, inbox: "_Inbox", item: tuple) -> None:
        """``item`` for ``inbox`` (the scheduler's thread); it is delivered after the pass of the
        decoding loop that made it, with the other requests' news: one wake-up of the event loop
        per pass, not one per token."""
        inbox.items.append(item)
        if not inbox.flagged:
            inbox.flagged = True
            self._woken.append(inbox)

    def _deliver_soon(self) -> None:
        """The end of a pass of the decoding loop (where the scheduler's messages are read: the
        event loop itself, or another thread)."""
        if self._woken and not self._delivery_due and self._loop is not None:
            if _running_loop() is self._loop:
                self._deliver()
                return
            self._delivery_due = True
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass

    def _deliver(self) -> None:
        self._delivery_due = False
        while self._woken:
            inbox = self._woken.popleft()
            inbox.flagged = False
            inbox.ready.set()

    async def run(self, fn: Callable[..., Any], *args) -> Any:
        """``fn(model, tokenizer, *args)`` where the scheduler runs the model (between two decoding
        steps); ``fn`` is a module-level function (it may be sent to the decoding process)."""
        try:
            self.bind_loop()
            return await asyncio.wrap_future(self.scheduler.call(fn, *args))
        except ValueError as e:
            raise APIError(str(e)) from None

    def usage(self, prompts: list[list[int]], completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


class _Inbox:
    """Events for one streaming request: ``items`` filled by the scheduler's thread, ``ready``
    set on the event loop once a pass of the decoding loop has added some."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple] = collections.deque()
        self.ready = asyncio.Event()
        self.flagged = False


class _RequireKey:
    """ASGI middleware: 401 on ``/v1/`` routes without ``Authorization: Bearer <key>``. A plain
    ASGI wrapper (not ``@app.middleware``, whose wrapper copies every streamed chunk through a
    memory stream and a task switch)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "no API key given" if not given else "the API key is wrong"
                response = APIError(f"{what}; send the header 'Authorization: Bearer <key>'", status=401,
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def serving_model(model, convert_hf: bool = True) -> tuple[Any, str | None]:
    """(the model to serve, how it is served): a Hugging Face model (``hf:DIR``) of an architecture
    that converts exactly (GPT-2, Llama: the same logits up to float rounding) becomes lmlab's
    Transformer with its weights, whose states merge, so concurrent requests share the decoding
    loop; other models are served as they are. ``how``: one line for the startup message and
    ``/v1/info`` (None for a model that is lmlab's own)."""
    converted_from = getattr(model, "converted_from", None)
    if converted_from:
        return model, f"lmlab's transformer, converted from the Hugging Face {converted_from} model"
    if getattr(model, "family", None) != "hf":
        return model, None
    if not convert_hf:
        return model, "the Hugging Face model as it is (conversion turned off)"
    if getattr(model, "quantization", None):
        return model, "the Hugging Face model as it is (quantized before it could be converted)"
    from lmlab.hf import to_lmlab

    try:
        converted = to_lmlab(model.hf, dtype=next(model.hf.parameters()).dtype)
    except ValueError as e:
        return model, f"the Hugging Face model as it is ({e})"
    converted = converted.to(model.device).eval()
    converted.converted_from = model.config.model_type
    return serving_model(converted)


def create_app(model, tokenizer, name: str = "lmlab", *, api_key: str | None = None, max_batch: int = 16,
               max_tokens_limit: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               decoding_process: bool | None = None, decoding_threads: int | None = None,
               convert_hf: bool = True) -> FastAPI:
    """The FastAPI app serving ``model`` (an lmlab model) with ``tokenizer`` under the id ``name``.

    ``convert_hf``: serve a Hugging Face model that converts exactly as lmlab's Transformer
    (``serving_model``: continuous batching); False keeps it as it is (one request at a time).

    ``decoding_process``: run the decoding loop in a process of its own (``WorkerScheduler``)
    rather than on a thread of this one; None (default): a process when the model's states merge
    into batches (continuous batching), a thread otherwise (one request at a time, where the
    model's own cost dwarfs the HTTP layer's). ``decoding_threads``: torch threads of that
    process (default: every core but one)."""
    if tokenizer is None:
        raise ValueError("lmlab serve needs the model's tokenizer")
    model, served_as = serving_model(model, convert_hf)
    server = _Server(model, tokenizer, name, max_batch, max_tokens_limit, decoding_process, decoding_threads)
    server.served_as = served_as
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.close()

    app = FastAPI(title="lmlab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    static = resources.files("lmlab.serve") / "static"

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(str(e.detail), status=e.status_code, kind="not_found_error" if e.status_code == 404
                        else "invalid_request_error").response()

    if api_key is not None:
        app.add_middleware(_RequireKey, api_key=api_key)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(f"the request body of {declared} bytes is over the limit of {max_body_bytes}", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(f"the request body is over the limit of {max_body_bytes} bytes", status=413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    # ------------------------------------------------------------ models

    @app.get("/v1/models")
    async def models():
        card = {"id": name, "object": "model", "created": server.created, "owned_by": "lmlab"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id}")
    async def model_card(model_id: str):
        server.check_model({"model": model_id})
        return {"id": name, "object": "model", "created": server.created, "owned_by": "lmlab"}

    @app.get("/v1/info")
    async def info():
        """lmlab's description of the served model (the playground reads it)."""
        return {"model": name, "family": getattr(model, "family", type(model).__name__),
                "vocab_size": int(model.vocab_size), "context": server.context,
                "layers": _attention_layers(model), "heads": _attention_heads(model),
                "chat": _has_chat_template(tokenizer), "policy": server.scheduler.policy, "served_as": served_as,
                "max_batch": server.scheduler.max_batch, "max_tokens_limit": server.max_tokens_limit}

    # ------------------------------------------------------------ completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        _unknown(body, COMPLETION_FIELDS)
        server.check_model(body)
        if body.get("suffix") is not None:
            raise APIError("suffix is not supported", "suffix")
        if "prompt" not in body:
            raise APIError("prompt is required", "prompt")
        setup = _setup(body, int(model.vocab_size))
        n = setup.num_return_sequences
        best_of = _int(body, "best_of", None, 1)
        if best_of is not None and best_of != n:
            raise APIError(f"best_of={best_of} is not supported; give best_of equal to n or leave it out", "best_of")
        echo = _bool(body, "echo")
        max_tokens = _int(body, "max_tokens", 16, 0)
        if max_tokens == 0 and not echo:
            raise APIError("max_tokens=0 generates nothing; give max_tokens >= 1 (or echo: true to score the prompt)",
                           "max_tokens")
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        prompts = server.encode_prompts(body["prompt"], _bool(body, "add_bos"))
        server.check_lengths(prompts, max_tokens, n)
        request_ = _Request(server, body, setup, prompts, max_tokens, logprobs, echo, chat=False)
        return await request_.respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        _unknown(body, CHAT_FIELDS)
        server.check_model(body)
        if not _has_chat_template(tokenizer):
            raise APIError(f"model {name!r} has no chat template; use /v1/completions with a plain prompt", "messages")
        messages = _messages(body.get("messages"))
        from lmlab.hf import chat_ids

        try:
            prompt = chat_ids(tokenizer, messages)
        except Exception as e:  # the template itself refuses (e.g. roles out of order)
            raise APIError(f"the chat template cannot format these messages: {e}", "messages") from None
        setup = _setup(body, int(model.vocab_size))
        max_tokens = _int(body, "max_completion_tokens", None, 1)
        max_tokens = _int(body, "max_tokens", 16 if max_tokens is None else max_tokens, 1)
        want_logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want_logprobs:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
        server.check_lengths([prompt], max_tokens, setup.num_return_sequences)
        request_ = _Request(server, body, setup, [prompt], max_tokens, (top or 0) if want_logprobs else None,
                            False, chat=True)
        return await request_.respond()

    # ------------------------------------------------------------ lmlab's own

    @app.post("/v1/score")
    async def score(request: Request):
        body = await read_json(request)
        _unknown(body, ("model", "text", "window", "stride"))
        server.check_model(body)
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise APIError(f"text must be a non-empty string, got {text!r}"[:200], "text")
        window = _int(body, "window", None, 1, server.context)
        stride = _int(body, "stride", None, 1, window)
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            raise APIError(f"text encodes to {len(ids)} token(s); scoring needs at least 2", "text")
        result, per_token = await server.run(_score, text, window, stride)
        totals = result.as_dict()
        totals["scored_tokens"] = totals.pop("tokens")
        return {"object": "score", "model": name, "tokens": [server.token_text(t) for t in ids],
                "token_ids": ids, "token_logprobs": [None, *per_token], **totals}

    @app.post("/v1/next-token")
    async def next_token(request: Request):
        body = await read_json(request)
        _unknown(body, ("model", "prompt", "top_n", "add_bos", "temperature", "top_k", "top_p", "min_p", "typical_p",
                        "repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram_size",
                        "logit_bias"))
        server.check_model(body)
        top_n = _int(body, "top_n", 20, 1, int(model.vocab_size))
        if not isinstance(body.get("prompt"), str):
            raise APIError(f"prompt must be a string, got {body.get('prompt')!r}"[:200], "prompt")
        (prompt,) = server.encode_prompts(body["prompt"], _bool(body, "add_bos"))
        server.check_lengths([prompt], 1, 1)
        setup = _setup({**body, "n": 1}, int(model.vocab_size))
        before, after = await server.run(_next_token_distribution, prompt, server.processors(setup))
        values, index = before.topk(top_n)
        return {"object": "next_token", "model": name, "prompt_tokens": len(prompt),
                "entropy": _entropy(before), "processed_entropy": _entropy(after),
                "kept": int(torch.isfinite(after).sum()),
                "tokens": [{"id": int(i), "text": server.token_text(int(i)), "logprob": float(v),
                            "prob": math.exp(float(v)), "processed_logprob": _finite(after[i]),
                            "processed_prob": math.exp(float(after[i]))} for i, v in zip(index, values)]}

    @app.post("/v1/attention")
    async def attention(request: Request):
        body = await read_json(request)
        _unknown(body, ("model", "prompt", "layer"))
        server.check_model(body)
        if _attention_layers(model) is None:
            raise APIError(f"the {getattr(model, 'family', 'served')} model has no attention weights to show "
                           "(transformers only)", "model")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise APIError("prompt must be a non-empty string", "prompt")
        layer = _int(body, "layer", 0, 0, _attention_layers(model) - 1)
        tokens, weights = await server.run(_attention, prompt, layer)
        ids = tokenizer.encode(prompt)[-len(tokens):]
        return {"object": "attention", "model": name, "layer": layer,
                "tokens": [server.token_text(t) for t in ids], "weights": weights.tolist()}

    # ------------------------------------------------------------ playground

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


# ---------------------------------------------------------------- what runs beside the decoding loop
# (module-level: they may be sent by name to the decoding process; each gets the model and tokenizer first)


def _score(model, tokenizer, text: str, window: int | None, stride: int | None):
    """(ScoreResult, per-token log-probabilities) of ``text``."""
    from lmlab.score import score_text

    per_token: list[float] = []
    return score_text(model, tokenizer, text, window, stride, token_logprobs=per_token), per_token


@torch.no_grad()
def _next_token_distribution(model, tokenizer, prompt: list[int], processors) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (V,) of the next token after ``prompt``, before and after ``processors``."""
    from lmlab.decode.processors import apply_processors

    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    logits, _ = model.next_token_logits(ids, None)
    logits = logits.float()
    scores = apply_processors(processors, logits, ids, num_generated=0)
    return torch.log_softmax(logits, -1)[0].cpu(), torch.log_softmax(scores, -1)[0].cpu()


def _attention(model, tokenizer, prompt: str, layer: int):
    from lmlab.plots import attention_for_text

    return attention_for_text(model, tokenizer, prompt, layer=layer)


def _prompt_logprobs(model, tokenizer, prompts: list[list[int]], top: int):
    from lmlab.score import position_logprobs

    return [position_logprobs(model, p, top) for p in prompts]


def _beam_search(model, tokenizer, prompts, setup: DecodingSetup, max_tokens: int, seed, stop: list[str]):
    return run_setup(model, tokenizer, prompts, setup, max_tokens, seed=seed, stop_strings=stop,
                     context_policy="error")


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(getattr(tokenizer, "hf", None), "chat_template", None))


def _attention_layers(model) -> int | None:
    return len(model.blocks) if getattr(model, "family", None) == "transformer" else None


def _attention_heads(model) -> int | None:
    return model.config.n_head if getattr(model, "family", None) == "transformer" else None


def _entropy(logp: torch.Tensor) -> float:
    p = logp.exp()
    return float(-torch.where(p > 0, p * logp, torch.zeros_like(logp)).sum())


def _finite(value) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def _messages(value) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise APIError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a role and a content", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(f"messages[{i}].content parts must all be of type text", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string, got {content!r}"[:200], "messages")
        out.append({"role": m["role"], "content": content})
    return out


# ---------------------------------------------------------------- one request


class _Request:
    """A completion or chat request: its jobs (one per prompt) and the response shapes."""

    def __init__(self, server: _Server, body: dict, setup: DecodingSetup, prompts: list[list[int]], max_tokens: int,
                 logprobs: int | None, echo: bool, chat: bool) -> None:
        self.server, self.setup, self.prompts = server, setup, prompts
        self.max_tokens, self.logprobs, self.echo, self.chat = max_tokens, logprobs, echo, chat
        self.n = setup.num_return_sequences
        self.stop = _stop(body)
        self.seed = _int(body, "seed", None)
        self.stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise APIError("stream_options accepts only {\"include_usage\": bool}", "stream_options")
        if options is not None and not self.stream:
            raise APIError("stream_options needs stream: true", "stream_options")
        self.include_usage = bool(options and _bool(options, "include_usage"))
        self.beam = setup.search == "beam"
        if self.beam and self.stream:
            raise APIError("beam search (num_beams) returns whole hypotheses; it cannot stream", "stream")
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        # Every streamed chunk is this request's fixed fields around its choices: serialized once.
        head = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.created, "model": server.name, "system_fingerprint": None}
        self._chunk_head = "data: " + json.dumps(head)[:-1] + ", \"choices\": "
        self._chunk_tail = ", \"usage\": null}\n\n" if self.include_usage else "}\n\n"

    # ------------------------------------------------------------ running

    def jobs(self, on_event=None, on_done=None) -> list[Job]:
        server = self.server
        processors = server.processors(self.setup)
        out = []
        for i, p in enumerate(self.prompts):
            job = Job(prompt_ids=p, max_new_tokens=self.max_tokens, processors=processors,
                      do_sample=self.setup.search == "sample", seed=self.seed, eos_id=server.eos_id,
                      stop_strings=self.stop, n=self.n, alternatives=self.logprobs or 0,
                      on_event=None if on_event is None else (lambda e, i=i: on_event(i, e)), on_done=on_done)
            out.append(job)
        return out

    async def prompt_logprobs(self) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
        if not self.echo or self.logprobs is None:
            return [([], []) for _ in self.prompts]
        return await self.server.run(_prompt_logprobs, self.prompts, self.logprobs)

    async def generate(self) -> list[list]:
        """Per prompt, the n rows as Generation-like objects (token_ids, logprobs, text, finish_reason)."""
        server = self.server
        if self.max_tokens == 0:
            return [[_Empty() for _ in range(self.n)] for _ in self.prompts]
        if self.beam:
            return await server.run(_beam_search, self.prompts, self.setup, self.max_tokens, self.seed, self.stop)
        loop = asyncio.get_running_loop()
        remaining = len(self.prompts)
        finished = loop.create_future()

        def on_done():
            def mark():
                nonlocal remaining
                remaining -= 1
                if remaining == 0 and not finished.done():
                    finished.set_result(None)
            loop.call_soon_threadsafe(mark)

        self.collected: dict[tuple[int, int], list[TokenEvent]] = {}

        def on_event(i: int, e: TokenEvent) -> None:  # the scheduler's thread; read once the jobs are done
            self.collected.setdefault((i, e.row), []).append(e)

        jobs = self.jobs(on_event=on_event if self.logprobs else None, on_done=on_done)
        for job in jobs:
            server.submit(job)
        try:
            await finished
        except asyncio.CancelledError:  # the client went away: free the rows
            for job in jobs:
                server.scheduler.cancel(job)
            raise
        for job in jobs:
            if job.error:
                raise APIError(f"generation failed: {job.error}", status=500, kind="server_error")
        return [job.results for job in jobs]

    async def respond(self):
        if self.stream:
            return StreamingResponse(self.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        prompt_lps = await self.prompt_logprobs()
        results = await self.generate()
        choices = []
        completion_tokens = 0
        for i, rows in enumerate(results):
            for j, r in enumerate(rows):
                completion_tokens += len(r.token_ids)
                alts = [e.alternatives for e in getattr(self, "collected", {}).get((i, j), [])]
                choices.append(self.choice(i * self.n + j, i, r, prompt_lps[i], alts))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.server.name,
                "system_fingerprint": None, "choices": choices,
                "usage": self.server.usage(self.prompts, completion_tokens)}

    # ------------------------------------------------------------ shapes

    def choice(self, index: int, prompt_index: int, r, prompt_lps, alts: list) -> dict:
        """One choice of a whole response; ``alts``: per generated token, (id, logprob, processed) triples."""
        finish = _finish_reason(r.finish_reason)
        alts = alts or [[] for _ in r.token_ids]
        if self.chat:
            lp = None
            if self.logprobs is not None:
                lp = {"content": [self.chat_logprob(t, l, a) for t, l, a in zip(r.token_ids, r.logprobs, alts)]}
            return {"index": index, "message": {"role": "assistant", "content": r.text}, "logprobs": lp,
                    "finish_reason": finish}
        text = r.text
        lp = None
        prompt = self.prompts[prompt_index]
        tokenizer = self.server.tokenizer
        prompt_text = tokenizer.decode(prompt) if self.echo else ""
        text = prompt_text + text
        if self.logprobs is not None:
            tokens = list(r.token_ids)
            token_lps: list[float | None] = list(r.logprobs)
            tops: list[dict | None] = [self.top_dict((t, l) for t, l, _ in a) for a in alts]
            offsets = [len(prompt_text) + o for o in text_offsets(tokenizer, prompt, tokens)]
            if self.echo:
                p_lps, p_tops = prompt_lps
                tokens = prompt + tokens
                token_lps = [None, *p_lps, *token_lps]
                tops = [None, *[self.top_dict(alts) for alts in p_tops], *tops]
                offsets = text_offsets(tokenizer, [], prompt) + offsets
            lp = self.legacy_logprobs(tokens, token_lps, tops, offsets)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def top_dict(self, alts) -> dict[str, float]:
        return {self.server.token_text(t): float(lp) for t, lp in alts}

    def legacy_logprobs(self, tokens: list[int], lps: list, tops: list, offsets: list[int]) -> dict:
        """The completions API's logprobs object; ``offsets``: where each token's text begins
        (:func:`~lmlab.tokenizers.text_offsets`)."""
        return {"tokens": [self.server.token_text(t) for t in tokens], "token_logprobs": lps,
                "top_logprobs": tops, "text_offset": offsets}

    def chat_logprob(self, token: int, logprob: float, alts) -> dict:
        server = self.server
        return {"token": server.token_text(token), "logprob": logprob, "bytes": server.token_bytes(token),
                "top_logprobs": [{"token": server.token_text(t), "logprob": lp, "bytes": server.token_bytes(t)}
                                 for t, lp, _ in alts]}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """One server-sent event: ``data: {id, object, created, model, system_fingerprint, choices[, usage]}``."""
        tail = self._chunk_tail if usage is None else f", \"usage\": {json.dumps(usage)}}}\n\n"
        return self._chunk_head + json.dumps(choices) + tail

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token per row, a last chunk with the finish reason per
        row, the usage (stream_options.include_usage), then ``data: [DONE]``."""
        server = self.server
        inbox = server.inbox()
        rows = {(i, j): StreamedRow(server.tokenizer, self.prompts[i], self.stop, server.eos_id)
                for i in range(len(self.prompts)) for j in range(self.n)}
        offsets = {k: 0 for k in rows}

        def on_event(i: int, e: TokenEvent) -> None:
            server.post(inbox, ("token", i, e))

        jobs = self.jobs(on_event=on_event, on_done=lambda: server.post(inbox, ("done",)))
        try:
            prompt_lps = await self.prompt_logprobs()
            if self.chat:
                yield self.chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None} for k in range(self.n)])
            elif self.echo:
                for (i, j) in rows:
                    text = server.tokenizer.decode(self.prompts[i])
                    lp = None
                    if self.logprobs is not None:
                        p_lps, p_tops = prompt_lps[i]
                        lp = self.legacy_logprobs(self.prompts[i], [None, *p_lps],
                                                  [None, *[self.top_dict(a) for a in p_tops]],
                                                  text_offsets(server.tokenizer, [], self.prompts[i]))
                        offsets[(i, j)] = len(text)
                    yield self.chunk([{"index": i * self.n + j, "text": text, "logprobs": lp, "finish_reason": None}])
            for job in jobs:
                server.submit(job)
            pending = len(jobs)
            while pending:
                # Tokens that arrived while the last chunk was sent go out together, one chunk per row.
                await inbox.ready.wait()
                inbox.ready.clear()
                items = []
                while inbox.items:
                    items.append(inbox.items.popleft())
                grouped: dict[tuple[int, int], list[TokenEvent]] = {}
                for item in items:
                    if item[0] == "done":
                        pending -= 1
                    else:
                        grouped.setdefault((item[1], item[2].row), []).append(item[2])
                for key, events in grouped.items():
                    delta = "".join(rows[key].add(e.token_id) for e in events)
                    yield self.chunk([self.stream_choice(key[0] * self.n + key[1], delta, events,
                                                         offsets[key], rows[key])])
            completion_tokens = 0
            last = []  # the closing events go out in one write
            for i, job in enumerate(jobs):
                if job.error:
                    yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
                    return
                for j, r in enumerate(job.results):
                    completion_tokens += len(r.token_ids)
                    rest = rows[(i, j)].rest(r.text)
                    key = "delta" if self.chat else "text"
                    value = {"content": rest} if self.chat else rest
                    last.append(self.chunk([{"index": i * self.n + j, key: value, "logprobs": None,
                                             "finish_reason": _finish_reason(r.finish_reason)}]))
            if self.include_usage:
                last.append(self.chunk([], usage=server.usage(self.prompts, completion_tokens)))
            last.append("data: [DONE]\n\n")
            yield "".join(last)
        finally:  # also when the client disconnects: the rows leave the batch at the next step
            for job in jobs:
                if not job.done.is_set():
                    server.scheduler.cancel(job)

    def stream_choice(self, index: int, delta: str, events: list[TokenEvent], base: int, row: StreamedRow) -> dict:
        """A chunk's choice for one row: the text of ``events`` (one or more new tokens, already
        added to ``row``); ``base``: where the row's generated text begins (after an echoed prompt)."""
        lp = None
        if self.logprobs is not None:
            if self.chat:
                lp = {"content": [self.chat_logprob(e.token_id, e.logprob, e.alternatives) for e in events]}
            else:
                lp = self.legacy_logprobs([e.token_id for e in events], [e.logprob for e in events],
                                          [self.top_dict((t, l) for t, l, _ in e.alternatives) for e in events],
                                          [base + o for o in row.offsets[len(row.offsets) - len(events):]])
                # lmlab's extras for the playground: the processed log-prob and the alternatives before/after.
                lp["processed_logprobs"] = [None if e.processed_logprob is None else _finite(e.processed_logprob)
                                            for e in events]
                lp["alternatives"] = [[{"id": t, "token": self.server.token_text(t), "logprob": l,
                                        "processed_logprob": _finite(p)} for t, l, p in e.alternatives]
                                      for e in events]
        if self.chat:
            return {"index": index, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None}
        return {"index": index, "text": delta, "logprobs": lp, "finish_reason": None}


class _Empty:
    """No generated tokens (max_tokens=0 with echo: scoring the prompt)."""

    token_ids: list[int] = []
    logprobs: list[float] = []
    text = ""
    finish_reason = "length"


def serve(model_spec: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_tokens_limit: int | None = None, device: str = "cpu",
          dtype: str | None = None, quantize: str | None = None, quantize_output: str | None = None,
          decoding_threads: int | None = None, log_level: str = "warning", convert_hf: bool = True) -> None:
    """Load ``model_spec`` (a checkpoint directory, ``gguf:FILE`` or ``hf:DIR``; an ``hf:`` model
    that converts exactly becomes lmlab's Transformer unless ``convert_hf=False``, see
    ``serving_model``) at the precision ``dtype``/``quantize``/``quantize_output`` asks (as
    ``lmlab generate`` does) and serve it until interrupted."""
    import uvicorn

    from lmlab.checkpoints import load_checkpoint
    from lmlab.quantize import prepare_model

    if max_tokens_limit is not None and max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    model, tokenizer = load_checkpoint(model_spec, device)
    model, served_as = serving_model(model, convert_hf)  # converted from the float weights, then quantized
    prepare_model(model, dtype=dtype, quantize=quantize, output=quantize_output)
    name = model_spec.rstrip("/")
    app = create_app(model, tokenizer, name, api_key=api_key, max_batch=max_batch, max_tokens_limit=max_tokens_limit,
                     decoding_threads=decoding_threads)
    server = app.state.server
    precision = ", ".join(p for p in (dtype, quantize, quantize_output and f"output {quantize_output}") if p)
    where = "its own process" if getattr(server.scheduler, "threads", None) else "a thread"
    print(f"lmlab serve: {name} ({served_as or getattr(model, 'family', 'model')}"
          f"{', ' + precision if precision else ''}, {server.scheduler.policy} on {where}, max batch {max_batch}) "
          f"at http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
