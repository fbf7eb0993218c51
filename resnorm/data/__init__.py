"""Datasets as token streams: the corpora, data=hf through the datasets library, tokenizers, the token cache,
and the checks a config's data must pass before training."""
