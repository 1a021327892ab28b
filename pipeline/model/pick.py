"""Which retrieved document the aggregator's mass picks: pooled over each document's windows, with the retriever's
top-1 document as a floor.

The aggregator weighs retrieved *windows* (chunks); a long article contributes several. The pick is made per
**document**: a document's weight is its windows' mass pooled (``sum``, the citation weight; or ``max``). Without a
margin the heaviest document is picked (the behaviour before this module). With a ``margin`` the retriever's top-1
document (the document of the best-scored window) is the default, and the aggregator's heaviest document replaces it
only when its pooled mass beats the retriever's document's by more than ``margin`` (mass sums to 1 over the
retrieved windows, so the margin is in [0, 1]; 0 only drops ties to the retriever, 1 always keeps the retriever).

The rule is stored next to a checkpoint as ``pick.json`` (calibrated on held-out weeks of the training years by
``macstream calibrate-pick``). Like the answer prompt it is not part of the checkpoint version: it changes which
stored text is read, never what a stored modulation means, so it needs no re-encoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PICK_FILE = "pick.json"


class DocumentPick(BaseModel):
    """The document-pick rule (see the module docstring). Validated where it is read (``pick.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pooling: Literal["sum", "max"] = Field("sum", description="How a document's windows' mass is pooled.")
    margin: float | None = Field(None, ge=0.0, le=1.0, description="Retriever floor: the aggregator's document "
                                 "replaces the retriever's top-1 document only when its pooled mass is higher by more "
                                 "than this. None: no floor (the heaviest document is picked).")
    calibration: dict = Field(default_factory=dict, description="How the margin was chosen (provenance only).")


def pooled(doc_ids: Sequence[str], mass: Sequence[float], pooling: str = "sum") -> dict[str, float]:
    """Per document (in order of first appearance among the windows): its windows' mass pooled by ``sum`` or
    ``max``. ``doc_ids[j]`` is the document of window j, ``mass[j]`` its mass; the lengths must match."""
    if len(doc_ids) != len(mass):
        raise ValueError(f"{len(doc_ids)} windows but {len(mass)} masses")
    if pooling not in ("sum", "max"):
        raise ValueError(f"pooling {pooling!r}: expected 'sum' or 'max'")
    out: dict[str, float] = {}
    for d, m in zip(doc_ids, mass):
        m = float(m)
        out[d] = (out.get(d, 0.0) + m) if pooling == "sum" else max(out.get(d, m), m)
    return out


def pick_order(doc_ids: Sequence[str], mass: Sequence[float], rule: DocumentPick | None = None) -> list[str]:
    """The retrieved documents in the order their texts are read: the picked one first, then the others by pooled
    mass, heaviest first (ties: retriever order). ``doc_ids``: each retrieved window's document, in the retriever's
    order (best first); ``mass``: each window's aggregator mass. ``rule`` None is ``DocumentPick()``: sum pooling,
    no floor. Deterministic; an empty input gives an empty list."""
    rule = rule or DocumentPick()
    weight = pooled(doc_ids, mass, rule.pooling)
    order = sorted(weight, key=lambda d: -weight[d])  # stable: ties keep the retriever's order
    if not order or rule.margin is None:
        return order
    floor = doc_ids[0]  # the retriever's top-1 document
    first = order[0] if weight[order[0]] - weight[floor] > rule.margin else floor
    return [first] + [d for d in order if d != first]


def load_pick(directory: str | Path) -> DocumentPick | None:
    """The pick rule stored in ``directory`` (``pick.json``), or None when there is none. A ValueError naming the file
    when it is not a valid rule."""
    path = Path(directory) / PICK_FILE
    if not path.exists():
        return None
    try:
        return DocumentPick.model_validate_json(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not a document-pick rule: {err}") from None


def save_pick(rule: DocumentPick, directory: str | Path) -> Path:
    """Write ``directory/pick.json``; return its path."""
    path = Path(directory) / PICK_FILE
    path.write_text(json.dumps(rule.model_dump(), indent=2) + "\n")
    return path
