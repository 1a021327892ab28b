"""HTTP request and response bodies. Every bad field is a 4xx naming the field, before anything reaches the model.

Limits are fixed here, so the OpenAPI document states them: question ≤ 4,000 characters, top_k 1..64,
max_new_tokens 1..256. The OpenAI-compatible bodies ignore OpenAI fields macstream does not use (clients send
many), but the ``macstream`` extension field is strict.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.modes import TEXT_KINDS, Kind, Mode
from pipeline.store import SearchFilter

MAX_QUESTION_CHARS = 4000
MAX_TOP_K = 64
MAX_NEW_TOKENS = 256
MODEL_NAME = "macstream"


class MemoryControls(BaseModel):
    """How the answer uses memory: mode, how many chunks to retrieve, and retrieval filters."""

    model_config = ConfigDict(extra="forbid")

    mode: Kind | None = Field(None, description=(
        "mac (aggregated modulations), rag (texts in the prompt), mac+rag, select+rag (the texts the aggregator "
        "selects, read behind the checkpoint's answer prompt), or base (no memory). Default: the server's best "
        "measured mode (GET /health names it; out of the box select+rag with context_docs 1)."))
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="Chunks retrieved (default: the server's).")
    since: datetime | None = Field(None, description="Only documents published at or after (ISO-8601).")
    until: datetime | None = Field(None, description="Only documents published at or before (ISO-8601).")
    source: str | None = Field(None, max_length=200, description="Only documents of this source.")
    tenant: str | None = Field(None, max_length=200,
                               description="Only this tenant's documents; with API keys it must be the key's tenant.")
    context_docs: int | None = Field(None, ge=1, le=MAX_TOP_K, description=(
        "rag, mac+rag and select+rag: put only this many retrieved documents' texts in the prompt — the retriever's "
        "best for rag, the ones the aggregator weighs most for the other two (default: all retrieved)."))

    @model_validator(mode="after")
    def _range(self):
        # context_docs without a mode applies to the server's default mode: checked by the gateway, which knows it
        SearchFilter(since=self.since, until=self.until)  # since ≤ until, with the store's own message
        if self.context_docs is not None and self.mode is not None and self.mode not in TEXT_KINDS:
            raise ValueError(f"context_docs applies to the {', '.join(TEXT_KINDS)} modes, not {self.mode!r}")
        return self


def _question(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


class AnswerRequest(MemoryControls):
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, description="The question.")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Longest answer in tokens.")

    _q = field_validator("question")(_question)


class Source(BaseModel):
    id: str
    title: str | None = None
    url: str | None = None
    published_at: datetime | None = None
    score: float = Field(description="Retriever cosine similarity of the question and the document's best chunk.")
    weight: float | None = Field(
        None, description="Aggregator attention mass on the document (MAC modes): the citation weight.")


class Usage(BaseModel):
    """Tokens one request cost, counted with the served LM's own tokenizer (OpenAI's ``usage`` shape).

    ``prompt_tokens``: the text fed to the LM — the mode's prompt template with the question and, in the text modes,
    the retrieved texts put in the prompt. The memory prefix (the aggregated modulation, or the answer prompt of
    ``select+rag``) is not counted: its positions are key/value vectors, not tokens, and the checkpoint fixes their
    number. ``completion_tokens``: the tokens generated for the answer, without the stop token (newline or EOS) that
    ended it. ``total_tokens`` is their sum.
    """

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AnswerResponse(BaseModel):
    answer: str
    mode: str = Field(description="The mode that answered, as MODE or MODE@context_docs (e.g. mac+rag@1).")
    sources: list[Source]
    checkpoint: str
    fallback: str | None = Field(
        None, description="Set when the answer could not use memory (e.g. no document matched the filters).")
    timings: dict[str, float]
    usage: Usage = Field(description="Tokens the request cost (prompt, completion, total), as in the OpenAI endpoints.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(max_length=MAX_QUESTION_CHARS)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: with ``include_usage``, a last chunk before ``data: [DONE]`` carries ``usage``
    and an empty ``choices``; every other chunk carries ``usage: null``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description=f"Must be {MODEL_NAME!r}.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true (as OpenAI).")
    n: int = Field(1, ge=1, le=1, description="Only one choice is generated.")
    macstream: MemoryControls = Field(default_factory=MemoryControls, description="Memory controls (extension).")

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):  # `stream` is declared first, so it is validated already
            raise ValueError("only allowed when stream is true")
        return v

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)

    def question(self) -> str:
        """The last user message is the question (the LM is not a chat model here)."""
        users = [m.content for m in self.messages if m.role == "user"]
        if not users or not users[-1].strip():
            raise ValueError("messages: needs a non-empty user message")
        return users[-1]


class CompletionRequest(_OpenAIBase):
    prompt: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)

    _q = field_validator("prompt")(_question)


class AnswerJob(BaseModel):
    """What the gateway hands a model replica for one question: validated, defaults filled in, the tenant resolved from
    the API key. Immutable: the replica reads it and never changes it."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    question: str
    mode: Mode
    top_k: int = Field(ge=1, le=MAX_TOP_K)
    max_new_tokens: int = Field(ge=1, le=MAX_NEW_TOKENS)
    filter: SearchFilter | None = None
    load: int = Field(1, ge=1, description="Batched requests in flight through the gateway when this one was sent: "
                      "the replica sizes its batches from it (its own count lags while a generation blocks its loop).")

    def group_key(self) -> str:
        """Jobs with equal keys share one store query (same filter and top_k)."""
        return f"{self.top_k}|{self.filter.model_dump_json() if self.filter else ''}"
