"""resnorm: controlled ablations of residual connections and normalization in deep Transformers.

Imports are kept lazy: ``import resnorm`` does not import torch.
"""

__version__ = "0.1.0"
