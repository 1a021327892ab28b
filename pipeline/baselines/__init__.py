"""Online fine-tuning baselines of the MAC paper (Tack et al. 2024, §4.1: *Uniform* and *Salient Spans*).

MAC adapts to a document with one forward pass. The baselines adapt by gradient descent instead: documents arrive
in stream (published_at) order, and after each one the LM takes K optimiser steps on that document's
language-modelling loss. When the stream ends, the fine-tuned LM answers every question with the one-shot ``base``
prompt. Two modes:

- ``ft-uniform``: the loss covers every token of the document (title, date and text, as MAC reads it);
- ``ft-salient``: the loss covers only the tokens of *salient spans* (names, dates, numbers, money, percentages),
  found by :func:`salient_spans`, a documented regex heuristic (spaCy is not installed, and this project adds no
  dependencies). A document without a salient span takes no step.

**What is trained.** The whole LM (full fine-tuning). SmolLM2-135M: 135M parameters, 0.54 GB in fp32; with
gradients and AdamW's two moments, the training state is ~2.2 GB. That fits the 24 GiB here, so there is no LoRA
path: ``peft`` is not installed, and it would only be needed for LMs too large for full fine-tuning.

**The shared LM is never touched.** Each run deep-copies ``FrozenLM.model`` into an :class:`OnlineFinetuner`, which
owns the copy and its optimiser, answers through a :class:`~pipeline.model.lm.FrozenLM` view of the copy, and drops both
when its ``with`` block ends. The next run starts again from the shared, unchanged weights. The shared LM's
parameters keep ``requires_grad=False`` and never hold a ``.grad``.

**Costs, per document.** Wall time of the K steps, including tokenisation and the salient tagger. Memory, two
ways. ``peak_rss_mb`` is measured: the process's resident set (``/proc/self/statm``, sampled every 2 ms while
adapting) at its peak, minus the resident set just before the copy was made. It counts the copy, gradients,
optimiser state and activations, and it is the same measure ``bench_baselines`` uses for MAC's encode.
``state_mb`` is counted from the tensors: the copy's parameters, the gradients (same size) and the optimiser state.

**Hyperparameters** (optimiser, learning rate, K) are picked by :func:`tune` on the *validation* split, by token F1
over a small grid. They are never picked on test.
"""

from __future__ import annotations

from pipeline.baselines.finetune import OnlineFinetuner, config_for, run_stream
from pipeline.baselines.memory_use import PeakRSS, release_memory, rss_bytes
from pipeline.baselines.salient import document_tokens, salient_spans
from pipeline.baselines.tuning import DEFAULT_GRID, answer_with, finetune_eval, gold_logprobs, select_best, tune

__all__ = ["DEFAULT_GRID", "OnlineFinetuner", "PeakRSS", "answer_with", "config_for", "document_tokens",
           "finetune_eval", "gold_logprobs", "release_memory", "rss_bytes", "run_stream", "salient_spans",
           "select_best", "tune"]
