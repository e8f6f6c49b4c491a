"""Exponential moving average of a model's parameters, stored as the original ``LitEma`` does
(buffers ``decay``, ``num_updates`` and one per parameter, named without dots)."""

from __future__ import annotations

import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32, device="cpu"))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int, device="cpu")
        )
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move the averages one step towards ``model``'s current parameters."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_((1.0 - decay) * (s - p.to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters) -> None:
        self.collected_params = [p.clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
        self.collected_params = []
