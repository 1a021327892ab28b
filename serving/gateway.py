"""The HTTP gateway: the FastAPI ingress deployment (0 CPUs). It validates, authenticates and admits requests, and
hands each one to the model deployment as a typed :class:`~serving.schemas.AnswerJob`. It imports no model code
(no torch): the handle to the model deployment is injected by :func:`serving.app.build_app`.

Every error is JSON ``{"error": {"message", "type", "param"}}`` (OpenAI's shape): validation → 400/422 naming the
field, bad key → 401, foreign tenant → 403, unknown model → 404, too many requests in the service → 503 with
Retry-After, model still loading → 503. Nothing invalid reaches the model deployment.
"""


import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from pipeline.config import ServeConfig
from pipeline.modes import TEXT_KINDS, Mode
from pipeline.store import SearchFilter
from serving.auth import AuthError, tenant_for
from serving.metrics import ServeMetrics
from serving.schemas import (
    MODEL_NAME,
    AnswerJob,
    AnswerRequest,
    AnswerResponse,
    ChatRequest,
    CompletionRequest,
    MemoryControls,
)

METRICS = ServeMetrics()  # one per gateway process; error handlers count into it too
api = FastAPI(title="macstream", version="0.1.0",
              description="Answers from a frozen LM kept up to date by MAC memory of streamed news.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status,
                        headers=headers)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    METRICS.errors.labels(str(err.status)).inc()
    return _error(err.status, err.message, err.kind, err.param, err.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    status = 400 if first.get("type") == "json_invalid" else 422
    METRICS.errors.labels(str(status)).inc()
    msg = first.get("msg", "invalid request")
    return _error(status, f"{param}: {msg}" if param else msg, "invalid_request_error", param)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(api)
class Gateway:
    def __init__(self, model, cfg: ServeConfig):
        self.model = model
        self.stream_model = model.options(stream=True)
        self.cfg = cfg
        self.pending = 0  # requests in flight through this gateway (admission control)
        self.batchable = 0  # of which batched answers (not streams): the load the model replicas batch
        self.metrics = METRICS

    # ---- plumbing ----------------------------------------------------------------------------------------------------
    def _tenant(self, request: Request, controls: MemoryControls) -> str | None:
        try:
            tenant = tenant_for(request.headers.get("authorization"), self.cfg.api_keys)
        except AuthError as err:
            raise ApiError(401, str(err), "authentication_error", headers={"WWW-Authenticate": "Bearer"}) from None
        if tenant is not None and controls.tenant not in (None, tenant):
            raise ApiError(403, "tenant: this API key may only read its own tenant's documents", "permission_error",
                           "tenant")
        return tenant if tenant is not None else controls.tenant

    def _job(self, question: str, c: MemoryControls, max_new_tokens: int | None, tenant: str | None) -> AnswerJob:
        flt = {k: v for k, v in {"since": c.since, "until": c.until, "source": c.source, "tenant": tenant}.items()
               if v is not None}
        return AnswerJob(question=question, mode=self._mode(c), top_k=c.top_k or self.cfg.default_top_k,
                         max_new_tokens=max_new_tokens or self.cfg.default_max_new_tokens,
                         filter=SearchFilter(**flt) if flt else None)

    def _mode(self, c: MemoryControls) -> Mode:
        """The request's mode, or the server's default; a request's context_docs overrides the default's."""
        if c.mode is not None:
            return Mode(c.mode, c.context_docs)
        default = Mode.parse(self.cfg.default_mode)
        try:
            return Mode(default.kind, c.context_docs or default.context_docs)
        except ValueError:
            raise ApiError(422, f"context_docs applies to the {', '.join(TEXT_KINDS)} modes; the default mode is "
                                f"{self.cfg.default_mode!r}: name a mode", param="context_docs") from None

    def _admit(self) -> None:
        if self.pending >= self.cfg.max_pending:
            raise ApiError(503, f"the service has {self.pending} requests in flight (limit {self.cfg.max_pending}); "
                           "retry shortly", "overloaded", headers={"Retry-After": "1"})

    async def _answer(self, job: AnswerJob, endpoint: str) -> dict:
        self._admit()
        self.pending += 1
        self.batchable += 1
        t0 = time.perf_counter()
        try:
            # the replicas size their batches from this count: theirs undercounts while a generation blocks their loop
            out = await self.model.submit.remote(job.model_copy(update={"load": self.batchable}))
        finally:
            self.pending -= 1
            self.batchable -= 1
        if "error" in out:
            raise ApiError(503, out["message"], out["error"], headers={"Retry-After": "2"})
        self.metrics.observe(endpoint, job.mode.kind, time.perf_counter() - t0, out["timings"], out.pop("batch_size"))
        return out

    def _model_name(self, name: str) -> None:
        if name != MODEL_NAME:
            raise ApiError(404, f"model: unknown model {name!r}; this server has {MODEL_NAME!r}", "model_not_found",
                           "model")

    # ---- endpoints -----------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        """Liveness, and the defaults a request gets when it names none."""
        return {"status": "ok", "default_mode": self.cfg.default_mode, "default_top_k": self.cfg.default_top_k}

    @api.get("/ready")
    async def ready(self):
        status = await self.model.status.remote()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @api.get("/metrics")
    async def metrics_text(self):
        body, ctype = self.metrics.render()
        return PlainTextResponse(body, media_type=ctype)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "macstream"}]}

    @api.get("/v1/memory/stats")
    async def memory_stats(self, request: Request):
        tenant = self._tenant(request, MemoryControls())  # same auth as the data endpoints; scopes the counts
        status = await self.model.status.remote()
        if not status["ready"]:
            raise ApiError(503, status["error"] or "the model is still loading", "not_ready",
                           headers={"Retry-After": "2"})
        out = await self.model.memory_stats.remote(tenant)
        if "error" in out:
            raise ApiError(503, out["message"], out["error"], headers={"Retry-After": "2"})
        return out

    @api.post("/v1/answer", response_model=AnswerResponse)
    async def answer(self, body: AnswerRequest, request: Request):
        tenant = self._tenant(request, body)
        return await self._answer(self._job(body.question, body, body.max_new_tokens, tenant), "answer")

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._model_name(body.model)
        try:
            question = body.question()
        except ValueError as err:
            raise ApiError(422, str(err), param="messages") from None
        job = self._job(question, body.macstream, body.new_tokens(), self._tenant(request, body.macstream))
        return await self._openai(job, chat=True, stream=body.stream, include_usage=body.include_usage())

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._model_name(body.model)
        job = self._job(body.prompt, body.macstream, body.new_tokens(), self._tenant(request, body.macstream))
        return await self._openai(job, chat=False, stream=body.stream, include_usage=body.include_usage())

    # ---- OpenAI shapes -------------------------------------------------------------------------------------------
    async def _openai(self, job: AnswerJob, chat: bool, stream: bool, include_usage: bool = False):
        """A chat completion or a completion in OpenAI's shape, whole or streamed (server-sent events).

        Whole: ``usage`` (:class:`~serving.schemas.Usage`) counts the tokens. Streamed: with ``include_usage``, every
        chunk carries ``usage: null`` and one last chunk before ``data: [DONE]`` carries the counts with an empty
        ``choices`` (OpenAI's ``stream_options``); without it, no chunk has a ``usage`` field.
        """
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not stream:
            out = await self._answer(job, "chat" if chat else "completions")
            choice = ({"index": 0, "message": {"role": "assistant", "content": out["answer"]}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": out["answer"], "finish_reason": "stop"})
            return {"id": rid, "object": kind, "created": created, "model": MODEL_NAME, "choices": [choice],
                    "usage": out["usage"],
                    "macstream": {k: out[k] for k in ("sources", "checkpoint", "fallback", "timings", "mode")}}
        self._admit()
        status = await self.model.status.remote()
        if not status["ready"]:
            raise ApiError(503, status["error"] or "the model is still loading", "not_ready",
                           headers={"Retry-After": "2"})
        return StreamingResponse(self._sse(job, rid, created, chat, include_usage), media_type="text/event-stream")

    async def _sse(self, job: AnswerJob, rid: str, created: int, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.pending += 1
        t0 = time.perf_counter()

        def event(delta: str | None, finish: str | None, extra: dict | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish}
                if extra is not None:
                    choice["delta"]["role"] = "assistant"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            body = {"id": rid, "object": kind, "created": created, "model": MODEL_NAME, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            if extra is not None:
                body["macstream"] = extra
            return f"data: {json.dumps(body)}\n\n"

        usage = None
        try:
            async for piece in self.stream_model.stream.remote(job):
                if "sources" in piece:
                    yield event(None if chat else "", None, piece)
                elif "usage" in piece:
                    usage = piece["usage"]
                else:
                    yield event(piece["delta"], None)
            yield event(None, "stop")
            if include_usage:
                last = {"id": rid, "object": kind, "created": created, "model": MODEL_NAME, "choices": [],
                        "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
            self.metrics.observe("stream", job.mode.kind, time.perf_counter() - t0, None, 1)
        finally:
            self.pending -= 1
