"""Data stages: scrape (crawl, extract, filter, dedup), tokenize, chat data."""
