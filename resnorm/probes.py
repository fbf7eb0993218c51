"""Probes: statistics read from the model during training, without hooks (safe under torch.compile).

:class:`GradNormProbe` computes the total gradient norm and the gradient norm of every layer's
attention and MLP sublayer (branch weights and that sublayer's own norms) in one batched
``torch._foreach_norm`` call followed by one ``index_add_``; the result stays on the device, so the
trainer moves it to the host together with the loss, once per logging step.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

SUBLAYERS = ("attn", "mlp")


def layer_groups(model: nn.Module) -> List[Tuple[int, str, nn.Module]]:
    """(layer index, sublayer name, module) for every residual sublayer, in depth order."""
    return [(i, name, getattr(block, name)) for i, block in enumerate(model.blocks) for name in SUBLAYERS]


class GradNormProbe:
    """Total and per-(layer, sublayer) gradient norms from ``p.grad``, read after ``backward``."""

    def __init__(self, model: nn.Module, per_layer: bool = True):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.labels: List[Tuple[int, str]] = []
        group_of = {}
        if per_layer:
            for gid, (layer, sub, module) in enumerate(layer_groups(model)):
                self.labels.append((layer, sub))
                for p in module.parameters():
                    group_of[id(p)] = gid
        other = len(self.labels)  # embeddings, final norm, head: in the total only
        device = self.params[0].device
        self.index = torch.tensor([group_of.get(id(p), other) for p in self.params], device=device)
        self.n_groups = other + 1

    def compute(self) -> torch.Tensor:
        """A 1-D tensor on the parameters' device: [total norm, norm of group 0, group 1, ...]."""
        grads, index = [], self.index
        present = [p.grad is not None for p in self.params]
        if all(present):
            grads = [p.grad for p in self.params]
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            index = index[torch.tensor(present, device=index.device)]
        sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        groups = torch.zeros(self.n_groups, device=sq.device).index_add_(0, index, sq)
        return torch.cat([sq.sum().sqrt().view(1), groups[:-1].sqrt()])
