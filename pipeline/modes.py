"""The answer modes: one definition, parsed once at the edge, passed around as a :class:`Mode` value.

- ``base``: the frozen LM alone (one-shot prompt);
- ``rag``: the retrieved documents' texts in the prompt;
- ``mac``: the aggregated modulations of the retrieved chunks as the prefix (no text);
- ``mac+rag``: both.

``rag`` and ``mac+rag`` take ``context_docs`` (written ``rag@N`` / ``mac+rag@N``): only N documents' texts enter the
prompt — the retriever's best N for ``rag``, the N the aggregator weighs most for ``mac+rag``. The online
fine-tuning baselines (:data:`FT_MODES`) are evaluation modes, not answer modes: they need the document stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["base", "rag", "mac", "mac+rag"]
KINDS: tuple[str, ...] = get_args(Kind)
TEXT_KINDS = ("rag", "mac+rag")  # the kinds that put documents' texts in the prompt (and take context_docs)
FT_MODES = ("ft-uniform", "ft-salient")


@dataclass(frozen=True)
class Mode:
    """An answer mode. ``str(Mode("mac+rag", 1)) == "mac+rag@1"``; :meth:`parse` is its inverse."""

    kind: str
    context_docs: int | None = None  # rag / mac+rag: documents' texts in the prompt (None: every retrieved one)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mode {self.kind!r}; expected one of {list(KINDS)}, or rag@N / mac+rag@N")
        if self.context_docs is not None and (self.kind not in TEXT_KINDS or self.context_docs < 1):
            raise ValueError(f"mode {self}: @N (N >= 1 documents' texts in the prompt) applies to rag and mac+rag only")

    @classmethod
    def parse(cls, spec: "str | Mode") -> "Mode":
        """``"mac+rag@2"`` → Mode("mac+rag", 2); ``"mac"`` → Mode("mac"). Raises ValueError naming the valid modes."""
        if isinstance(spec, Mode):
            return spec
        kind, at, n = spec.partition("@")
        if at and not n.isdigit():
            raise ValueError(f"mode {spec!r}: @N (N >= 1 documents' texts in the prompt) applies to rag and mac+rag only")
        return cls(kind, int(n) if at else None)

    def __str__(self) -> str:
        return f"{self.kind}@{self.context_docs}" if self.context_docs else self.kind

    @property
    def uses_mac(self) -> bool:
        """The aggregated modulations enter the LM as its prefix."""
        return self.kind in ("mac", "mac+rag")

    @property
    def uses_text(self) -> bool:
        """Retrieved documents' texts enter the prompt."""
        return self.kind in TEXT_KINDS

    @property
    def uses_memory(self) -> bool:
        return self.kind != "base"


BASE = Mode("base")
