"""Prompt formats, in one place so training, evaluation and serving agree token for token.

MAC is trained with the bare format (the prefix carries the knowledge and teaches the answer style). The frozen
SmolLM2-Instruct emits end-of-turn at once on a bare "Question/Answer" prompt, so ``base`` and ``rag`` get a fixed
one-shot example; every mode stops at the first newline. Reports name the prompt each mode used.
"""

from __future__ import annotations

from pipeline.schemas import Document

MAC_PROMPT = "Question: {question}\nAnswer:"
ONE_SHOT = "Question: What is the capital of Italy?\nAnswer: Rome\n"
BASE_PROMPT = ONE_SHOT + MAC_PROMPT
RAG_PROMPT = "{context}\n\n" + ONE_SHOT + MAC_PROMPT
PROMPTS = {"base": BASE_PROMPT, "rag": RAG_PROMPT, "mac": MAC_PROMPT, "mac+rag": RAG_PROMPT, "select+rag": RAG_PROMPT}


def document_text(doc: Document) -> str:
    """What every model reads for a document: title, date and text (the date lets "in March 2024" match)."""
    head = [doc.title or ""]
    if doc.published_at is not None:
        head.append(doc.published_at.strftime("%B %d, %Y"))
    head = " — ".join(h for h in head if h)
    return f"{head}\n{doc.text}" if head else doc.text


def answer_continuation(answer: str) -> str:
    """The target the LM is trained to emit after a prompt: a space, the answer, a newline (the stop token)."""
    return " " + answer.strip() + "\n"


def prompt_for(mode: str, question: str, context_docs: list[Document] = ()) -> str:
    """The prompt of ``mode`` with whole documents as its context."""
    return prompt_with(mode, question, [document_text(d) for d in context_docs])


def prompt_with(mode: str, question: str, context: list[str] = ()) -> str:
    """The prompt of ``mode`` with these texts as its context (blank-line separated)."""
    if mode not in PROMPTS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(PROMPTS)}")
    return PROMPTS[mode].format(question=question.strip(), context="\n\n".join(context))
