"""The Transformer whose residual/normalization scheme comes from a variant record: norms, sublayers (blocks),
the streams (multi-stream, attention over depth, nGPT), initialisation. Knows nothing of training."""
