"""The portable evaluation format (docs/design.md §3): a directory with ``documents.jsonl`` and ``questions.jsonl``.

One JSON record per line, serialised with ``model_dump_json(exclude_none=True)``; blank lines are ignored. Reading
validates every line against :class:`~pipeline.schemas.Document` / :class:`~pipeline.schemas.Question`, and both
reading and writing check that ids are unique and that every ``doc_ids`` entry names a document of the set.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.schemas import Document, Question

DOCUMENTS_FILE = "documents.jsonl"
QUESTIONS_FILE = "questions.jsonl"

_M = TypeVar("_M", bound=BaseModel)


def write_portable(
    directory: str | Path, documents: Iterable[Document], questions: Iterable[Question]
) -> Path:
    """Write ``documents`` and ``questions`` into ``directory`` (created if needed, files overwritten); return it.

    Raises ``ValueError`` before writing anything if ids repeat or a question names an unknown document.
    """
    documents, questions = list(documents), list(questions)
    check_consistency(documents, questions)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in ((DOCUMENTS_FILE, documents), (QUESTIONS_FILE, questions)):
        with open(out / name, "w", encoding="utf-8") as f:
            for record in records:
                f.write(record.model_dump_json(exclude_none=True) + "\n")
    return out


def read_portable(directory: str | Path) -> tuple[list[Document], list[Question]]:
    """Read a portable dataset. A bad line raises ``ValueError`` naming the file, the 1-based line and the error."""
    root = Path(directory)
    documents = _read_jsonl(root / DOCUMENTS_FILE, Document)
    questions = _read_jsonl(root / QUESTIONS_FILE, Question)
    check_consistency(documents, questions)
    return documents, questions


def check_consistency(documents: list[Document], questions: list[Question]) -> None:
    """Raise ``ValueError`` if a document or question id repeats, or a ``doc_ids`` entry names no document."""
    doc_ids = _unique_ids(documents, "document")
    _unique_ids(questions, "question")
    for q in questions:
        missing = [d for d in q.doc_ids or () if d not in doc_ids]
        if missing:
            raise ValueError(f"question {q.id!r} refers to unknown document(s) {missing}")


def _unique_ids(records: list[Document] | list[Question], kind: str) -> set[str]:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate {kind} id {r.id!r}")
        seen.add(r.id)
    return seen


def _read_jsonl(path: Path, model: type[_M]) -> list[_M]:
    records: list[_M] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(model.model_validate_json(line))
            except ValidationError as err:
                raise ValueError(f"{path}:{lineno}: invalid {model.__name__}: {err}") from err
    return records
