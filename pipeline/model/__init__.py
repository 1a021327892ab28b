"""The networks around the frozen LM, one concept a file: ``weights`` (where weights come from), ``lm`` (the frozen
LM and prefix injection), ``encoder`` (MiniLM), ``attention`` (the cross-attention block), ``amortizer`` (document →
modulation), ``aggregator`` (question + modulations → φ*), ``expander`` (φ* → per-layer prefix), and ``mac`` (the
model that ties them together, its checkpoints and versions)."""
