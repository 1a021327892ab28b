"""The one-off studies in research/: each one imports (its code still fits the engine it measures), the index names
each one, and the two instruments the studies built on top of the product are checked on tiny models: the soft
prefix of the ceilings and the two-stream prefix."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from test_lm_injection import naive_logprob_sum, rand_ids

from pipeline.model.lm import FrozenLM, Prefix

RESEARCH = Path(__file__).resolve().parents[1] / "research"
STUDIES = sorted(p.stem for p in RESEARCH.glob("*.py") if p.stem != "__init__")


def test_there_are_studies_and_the_index_names_each_one() -> None:
    index = (RESEARCH / "README.md").read_text()
    assert len(STUDIES) >= 6
    missing = [s for s in STUDIES if f"]({s}.py)" not in index]
    assert not missing, f"research/README.md does not list {missing}"


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_imports_against_the_current_engine(study: str) -> None:
    module = importlib.import_module(f"research.{study}")
    assert callable(getattr(module, "main", None)), f"research/{study}.py has no main()"


def test_soft_prefix_of_real_token_embeddings_is_those_tokens(any_lm: FrozenLM) -> None:
    """Reading the input embeddings of tokens x as a soft prefix == putting x in front of the prompt."""
    from research.ceilings import soft_prefix

    x, prompt, cont = rand_ids(any_lm, 3, 1), rand_ids(any_lm, 4, 2), rand_ids(any_lm, 3, 3)
    with torch.no_grad():
        prefix = soft_prefix(any_lm, any_lm.model.get_input_embeddings()(torch.tensor([x])))
        got, n = any_lm.continuation_logprobs([prompt], [cont], prefix)
    assert prefix.keys.shape == (1, any_lm.num_layers, any_lm.num_kv_heads, 3, any_lm.head_dim)
    assert int(n) == 3
    assert abs(float(got) - naive_logprob_sum(any_lm, x + prompt, cont)) < 1e-3


def _prefix(b: int, p: int, fill: float, layers: int = 2, heads: int = 2, dim: int = 16) -> Prefix:
    return Prefix(torch.full((b, layers, heads, p, dim), fill), torch.full((b, layers, heads, p, dim), -fill))


def test_two_stream_puts_the_prompt_first_for_every_question() -> None:
    from research.two_stream import two_stream

    out = two_stream(_prefix(1, 3, 1.0), _prefix(4, 5, 2.0))
    assert out.keys.shape == (4, 2, 2, 8, 16) and out.values.shape == (4, 2, 2, 8, 16)
    assert (out.keys[:, :, :, :3] == 1).all() and (out.keys[:, :, :, 3:] == 2).all()
    assert (out.values[:, :, :, :3] == -1).all() and (out.values[:, :, :, 3:] == -2).all()
