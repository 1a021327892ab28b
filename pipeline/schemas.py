"""The records the pipeline flows on. Light on purpose (pydantic, numpy; no torch), so the HTTP gateway and the store
owner can import them without loading a model.

:class:`Document` and :class:`Question` are the portable evaluation format (docs/design.md, "Data"); every loader
converts to these. :class:`EncodedChunk` is what amortizing one document window yields; :class:`Hit` is what a store
search returns.

A portable dataset is a directory with ``documents.jsonl`` (one :class:`Document` per line) and
``questions.jsonl`` (one :class:`Question` per line). Unknown keys are rejected so typos surface at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.modulation import Modulation


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
    choices: list[str] | None = Field(default=None,
                                      description="Multiple-choice options; the gold answer is among them.")
    asked_at: datetime | None = Field(default=None, description="When the question is asked, ISO-8601.")


@dataclass
class EncodedChunk:
    """One document window after amortization: its modulation and its retrieval vector (unit norm, d_enc)."""

    modulation: Modulation
    vector: np.ndarray  # (d_enc,) float32


@dataclass
class Hit:
    """One retrieved chunk, with the document it belongs to."""

    chunk: EncodedChunk
    document: Document
    score: float  # cosine similarity of question and chunk vectors


@dataclass(frozen=True)
class EncodeFailure:
    """One document the model could not encode (an ingest consumer dead-letters it with this reason; the rest of
    its batch goes on)."""

    doc_id: str
    error: str  # "<ExceptionType>: <message>", at most 500 characters
