"""The networks around the frozen LM, one concept a file: ``weights`` (where weights come from), ``lm`` (the frozen
LM and prefix injection), ``encoder`` (MiniLM: retrieval vectors and the question's token states), ``attention``
(the cross-attention block), ``readout`` (the memory itself: the token selector that writes a modulation and the K/V
readout that reads it as a prefix), ``question`` (question → query tokens), ``aggregator`` (question + modulations →
attention mass per memory), ``prompt`` (a checkpoint's answer prompt) and ``mac`` (the model that ties them together,
its checkpoints and versions)."""
