"""Loader for the RealTimeQA weekly news quizzes (Kasai et al., 2023), read in place from the shared data folder.

The data are not ours to redistribute: they are read from ``../shared/data/realtimeqa`` next to the repository
(or ``$MACSTREAM_RTQA_DIR``, or an explicit ``root``), never copied into the repo. See that folder's README.md.

Mapping: every ``<year>/*_qa.jsonl`` row under ``past/`` and ``backnumber/`` becomes one :class:`Question`
(``rtqa-<question_id>``, gold answer = the correct choice). A row with non-empty HTML ``evidence`` also becomes one
:class:`Document` (``rtqa-<question_id>-ev``, tags stripped, entities unescaped, whitespace collapsed) that the
question's ``doc_ids`` names. Optionally the news articles retrieved for a question (``past/2022/*_gcs.jsonl``) are
added as extra documents ``rtqa-<question_id>-gcs<i>``, deduplicated by url; they are context, not gold.
Rows repeat across files: the first occurrence of a ``question_id`` wins. Malformed rows are logged and skipped.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

from pydantic import ValidationError

from pipeline.data.portable import write_portable
from pipeline.schemas import Document, Question

logger = logging.getLogger(__name__)

ENV_VAR = "MACSTREAM_RTQA_DIR"
_SUBDIRS = ("backnumber", "past")
_ROW_ERRORS = (AttributeError, KeyError, TypeError, ValueError, IndexError, SyntaxError, ValidationError)


def default_root() -> Path:
    """``$MACSTREAM_RTQA_DIR`` if set, else ``<repo>/../shared/data/realtimeqa``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "realtimeqa"


def available(root: str | Path | None = None) -> bool:
    """True if the folder holds at least one ``_qa.jsonl`` file in the expected layout."""
    base = Path(root) if root is not None else default_root()
    return any(any(base.glob(f"{sub}/*/*_qa.jsonl")) for sub in _SUBDIRS)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.parts.append(" ")  # "a<br>b" reads "a b", not "ab"; extra spaces collapse later

    def handle_endtag(self, tag: str) -> None:
        self.parts.append(" ")


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment: tags dropped, entities unescaped, whitespace collapsed to single spaces."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return " ".join("".join(parser.parts).split())


def _date(value: str) -> datetime:
    """``"YYYY/MM/DD"`` (most rows) or ``"YYYY-MM-DD"`` (some 2024 rows) → midnight UTC."""
    return datetime.strptime(value.strip().replace("-", "/"), "%Y/%m/%d").replace(tzinfo=UTC)


def _convert(row: dict) -> tuple[Document | None, Question]:
    qid = str(row["question_id"])
    choices = [str(c).strip() for c in row["choices"]]
    answer = row["answer"]
    index = int(answer[0] if isinstance(answer, list) else answer)
    if not 0 <= index < len(choices) or not choices[index]:
        raise ValueError(f"answer {answer!r} does not name a non-empty choice of {choices!r}")
    asked_at = _date(row["question_date"])
    text = html_to_text(row.get("evidence") or "")
    doc = None
    if text:
        doc = Document(
            id=f"rtqa-{qid}-ev",
            text=text,
            published_at=asked_at,
            source=row.get("question_source") or None,
            url=row.get("question_url") or None,
        )
    question = Question(
        id=f"rtqa-{qid}",
        question=row["question_sentence"],
        answers=[choices[index]],
        choices=choices,
        doc_ids=[doc.id] if doc else None,
        asked_at=asked_at,
    )
    return doc, question


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                logger.warning("%s:%d: skipped, not JSON: %s", path, lineno, err)
                continue
            if not isinstance(row, dict):
                logger.warning("%s:%d: skipped, not a JSON object", path, lineno)
                continue
            yield lineno, row


def _search_document(qid: str, i: int, item: dict) -> Document | None:
    url, text = item.get("url"), " ".join(str(item.get("text") or "").split())
    if not text or not url:
        return None
    published = item.get("publish_date")
    try:
        published_at = _date(published) if published else None
    except ValueError:
        published_at = None
    return Document(
        id=f"rtqa-{qid}-gcs{i}",
        text=text,
        title=item.get("title") or None,
        published_at=published_at,
        source=urlparse(url).hostname,
        url=url,
    )


def _search_documents(path: Path, wanted: set[str], seen: set[str]) -> Iterator[Document]:
    """Retrieved articles of the wanted questions in one ``_gcs.jsonl`` file, skipping urls and ids in ``seen``
    (a question's results can repeat across files)."""
    for lineno, row in _rows(path):
        qid = str(row.get("question_id"))
        if qid not in wanted:
            continue
        try:
            results = row["search_result"]
            if isinstance(results, str):
                results = ast.literal_eval(results)
            items = list(enumerate(results))
        except _ROW_ERRORS as err:
            logger.warning("%s:%d: skipped search results of %s: %s", path, lineno, qid, err)
            continue
        for i, item in items:
            try:
                doc = _search_document(qid, i, item)
            except _ROW_ERRORS as err:
                logger.warning("%s:%d: skipped search result %d of %s: %s", path, lineno, i, qid, err)
                continue
            if doc is not None and doc.url not in seen and doc.id not in seen:
                seen.update((doc.url, doc.id))
                yield doc


def load(
    years: Iterable[int], root: str | Path | None = None, with_search_results: bool = False
) -> tuple[list[Document], list[Question]]:
    """Documents and questions of the given quiz years (e.g. ``[2024]`` or ``range(2020, 2025)``), in file order.

    Raises ``FileNotFoundError`` if the folder is absent (check :func:`available` first); a year with no files simply
    contributes nothing.
    """
    base = Path(root) if root is not None else default_root()
    if not base.is_dir():
        raise FileNotFoundError(f"RealTimeQA folder not found: {base} (set {ENV_VAR} or pass root)")
    years = list(years)
    documents: list[Document] = []
    questions: dict[str, Question] = {}
    rows_seen: dict[str, dict] = {}
    for year in years:
        for sub in _SUBDIRS:
            for path in sorted((base / sub / str(year)).glob("*_qa.jsonl")):
                for lineno, row in _rows(path):
                    qid = str(row.get("question_id"))
                    if qid in rows_seen:
                        if row != rows_seen[qid]:
                            logger.warning("%s:%d: question_id %s repeats with other content; first kept",
                                           path, lineno, qid)
                        continue
                    try:
                        doc, question = _convert(row)
                    except _ROW_ERRORS as err:
                        logger.warning("%s:%d: skipped malformed row %s: %s", path, lineno, qid, err)
                        continue
                    rows_seen[qid] = row
                    questions[qid] = question
                    if doc is not None:
                        documents.append(doc)
    if with_search_results:
        seen: set[str] = set()
        for year in years:
            for path in sorted((base / "past" / str(year)).glob("*_gcs.jsonl")):
                documents.extend(_search_documents(path, set(questions), seen))
    return documents, list(questions.values())


def write_realtimeqa(
    out_dir: str | Path, years: Iterable[int], root: str | Path | None = None, with_search_results: bool = False
) -> Path:
    """Load the given years and write them in the portable format to ``out_dir`` (for local use; do not commit)."""
    documents, questions = load(years, root=root, with_search_results=with_search_results)
    return write_portable(out_dir, documents, questions)
