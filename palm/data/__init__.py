"""Data stages: crawling, corpus building, tokenization, chat data."""
