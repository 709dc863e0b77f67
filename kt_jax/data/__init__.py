"""Data layer: records and readers, tokenizers, the alpaca template, Grain pipelines."""
