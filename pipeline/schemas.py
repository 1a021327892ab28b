"""Records of the portable evaluation format (DESIGN.md §3); every loader converts to these.

A portable dataset is a directory with ``documents.jsonl`` (one :class:`Document` per line) and
``questions.jsonl`` (one :class:`Question` per line). Unknown keys are rejected so typos surface at the edge.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Document(BaseModel):
    """One news document. ``id`` is the idempotency key everywhere (store, Kafka key)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="Stable document id; the Kafka key and the store's idempotency key.")
    text: str = Field(min_length=1, description="Plain text of the document (no HTML).")
    title: str | None = Field(default=None, description="Headline, if any.")
    published_at: datetime | None = Field(default=None, description="Publication time, ISO-8601.")
    source: str | None = Field(default=None, description="Publisher or feed name.")
    url: str | None = Field(default=None, description="Where the document came from.")
    tenant: str | None = Field(default=None, description="Owner of the document; a tenant only ever retrieves its own.")

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v


class Question(BaseModel):
    """One question with its gold answers; ``doc_ids`` name the documents that answer it (for selection accuracy)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="Stable question id.")
    question: str = Field(min_length=1, description="The question text.")
    answers: list[str] = Field(min_length=1, description="Acceptable gold answers; the first is canonical.")
    doc_ids: list[str] | None = Field(default=None, description="Ids of the documents that contain the answer.")
    choices: list[str] | None = Field(default=None, description="Multiple-choice options; the gold answer is among them.")
    asked_at: datetime | None = Field(default=None, description="When the question is asked, ISO-8601.")
