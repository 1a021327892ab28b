"""Data sources for macstream: the portable JSONL format, synthetic dated news, and the RealTimeQA loader."""
