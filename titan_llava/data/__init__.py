"""Data: tokenizer, templates, AnyRes preprocessing, datasets, packing and the stateful loader."""
