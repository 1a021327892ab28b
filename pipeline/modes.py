"""The answer modes: one definition, parsed once at the edge, passed around as a :class:`Mode` value.

- ``base``: the frozen LM alone (one-shot prompt);
- ``rag``: the retrieved documents' texts in the prompt;
- ``mac``: the aggregated modulations of the retrieved chunks as the prefix (no text);
- ``mac+rag``: both;
- ``select+rag``: the aggregator, reading the retrieved modulations, *selects* the texts that enter the prompt, and
  the LM reads them behind the checkpoint's trained answer prompt (:mod:`pipeline.model.prompt`) instead of the
  memory's prefix (on real news the memory in the prefix costs more than it adds once the text is there:
  docs/results.md, "The two-stream prefix"). Without an answer prompt in the checkpoint, no prefix at all.

``rag``, ``mac+rag`` and ``select+rag`` take ``context_docs`` (written ``rag@N`` / ``mac+rag@N`` / ``select+rag@N``):
only N documents' texts enter the prompt — the retriever's best N for ``rag``, the N the aggregator weighs most for
the other two. The online
fine-tuning baselines (:data:`FT_MODES`) are evaluation modes, not answer modes: they need the document stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["base", "rag", "mac", "mac+rag", "select+rag"]
KINDS: tuple[str, ...] = get_args(Kind)
TEXT_KINDS = ("rag", "mac+rag", "select+rag")  # the kinds that put documents' texts in the prompt (take context_docs)
FT_MODES = ("ft-uniform", "ft-salient")


@dataclass(frozen=True)
class Mode:
    """An answer mode. ``str(Mode("mac+rag", 1)) == "mac+rag@1"``; :meth:`parse` is its inverse."""

    kind: str
    context_docs: int | None = None  # text kinds: documents' texts in the prompt (None: every retrieved one)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mode {self.kind!r}; expected one of {list(KINDS)}, "
                             f"or KIND@N for {list(TEXT_KINDS)}")
        if self.context_docs is not None and (self.kind not in TEXT_KINDS or self.context_docs < 1):
            raise ValueError(f"mode {self}: @N (N >= 1 documents' texts in the prompt) applies to "
                             f"{', '.join(TEXT_KINDS)} only")

    @classmethod
    def parse(cls, spec: str | Mode) -> Mode:
        """``"mac+rag@2"`` → Mode("mac+rag", 2); ``"mac"`` → Mode("mac"). Raises ValueError naming the valid modes."""
        if isinstance(spec, Mode):
            return spec
        kind, at, n = spec.partition("@")
        if at and not n.isdigit():
            raise ValueError(f"mode {spec!r}: @N (N >= 1 documents' texts in the prompt) applies to "
                             f"{', '.join(TEXT_KINDS)} only")
        return cls(kind, int(n) if at else None)

    def __str__(self) -> str:
        return f"{self.kind}@{self.context_docs}" if self.context_docs else self.kind

    @property
    def uses_mac(self) -> bool:
        """The aggregated modulations enter the LM as its prefix."""
        return self.kind in ("mac", "mac+rag")

    @property
    def uses_aggregator(self) -> bool:
        """The aggregator weighs the retrieved modulations (citation weights; the texts a text mode reads)."""
        return self.kind in ("mac", "mac+rag", "select+rag")

    @property
    def uses_text(self) -> bool:
        """Retrieved documents' texts enter the prompt."""
        return self.kind in TEXT_KINDS

    @property
    def uses_memory(self) -> bool:
        return self.kind != "base"


BASE = Mode("base")
