"""macstream pipeline: the MAC method (amortize → aggregate → answer with a frozen LM) and the records it flows on."""

__version__ = "0.1.0"
