"""A trainable LoRA adapter: the training-side :class:`~aspen.lora.op.WeightSource` of the shared LoRA op.

It holds ``nn.Parameter`` A ``[r, in]`` and B ``[out, r]`` per (layer, projection) and answers
``group_weights(layer, group)`` in the op's packed layout: the A rows of the group's targeted projections stacked
in row order, and per projection its rows, its slice of the group's output and ``Bt = (B * scale).t()``. Every
step is a plain differentiable torch op, so autograd reaches A and B and nothing else.

Initialisation is PEFT's: A kaiming-uniform with ``a = sqrt(5)``, B zeros (the adapter starts as a no-op), drawn
from a generator seeded by the adapter's seed, so an adapter starts from the same weights whether it trains alone
or fused with others.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from aspen.lora.group import GroupPart, GroupWeights
from aspen.lora.peft.reader import LoraAdapter, LoraWeights
from aspen.lora.peft.writer import save_peft_adapter
from aspen.model.config import LORA_TARGETS, ModelConfig
from aspen.model.decoder import GROUPS


def _key(layer: int, proj: str, kind: str) -> str:
    return f"l{layer}_{proj}_{kind}"


class TrainableLora(nn.Module):
    """LoRA weights of one adapter on every layer of ``config`` for ``targets``."""

    def __init__(self, config: ModelConfig, r: int, scale: float, targets: tuple[str, ...], seed: int,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.r = r
        self.scale = scale
        self.targets = tuple(p for p in LORA_TARGETS if p in targets)  # model order
        self.params = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for layer in range(config.num_hidden_layers):
            for proj in self.targets:
                in_f, out_f = config.module_shape(proj)
                a = torch.empty(r, in_f)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                self.params[_key(layer, proj, "A")] = nn.Parameter(a.to(device))
                self.params[_key(layer, proj, "B")] = nn.Parameter(torch.zeros(out_f, r, device=device))
        # per group: (targeted projections, their output offsets within the group)
        self._layout: dict[str, list[tuple[str, int, int]]] = {}
        for group, members in GROUPS.items():
            parts, out0 = [], 0
            for m in members:
                out_f = config.module_shape(m)[1]
                if m in self.targets:
                    parts.append((m, out0, out0 + out_f))
                out0 += out_f
            if parts:
                self._layout[group] = parts

    def A(self, layer: int, proj: str) -> nn.Parameter:
        return self.params[_key(layer, proj, "A")]

    def B(self, layer: int, proj: str) -> nn.Parameter:
        return self.params[_key(layer, proj, "B")]

    def group_weights(self, layer: int, group: str) -> GroupWeights | None:
        """The LoRA op's WeightSource: this adapter's weights for ``group`` of ``layer`` (None: untargeted)."""
        layout = self._layout.get(group)
        if layout is None:
            return None
        a = [self.A(layer, m) for m, _, _ in layout]
        parts = tuple(GroupPart(i * self.r, (i + 1) * self.r, o0, o1) for i, (_, o0, o1) in enumerate(layout))
        bts = tuple((self.B(layer, m) * self.scale).t() for m, _, _ in layout)
        return GroupWeights(a[0] if len(a) == 1 else torch.cat(a, dim=0), parts, bts)

    def to_lora_adapter(self, base_model_name_or_path: str | None = None) -> LoraAdapter:
        """A detached float32 copy in the serving/IO representation."""
        weights = {(layer, proj): LoraWeights(self.A(layer, proj).detach().float().cpu().clone(),
                                              self.B(layer, proj).detach().float().cpu().clone(), self.scale)
                   for layer in range(self.config.num_hidden_layers) for proj in self.targets}
        return LoraAdapter(weights=weights, target_modules=tuple(sorted(self.targets)),
                           base_model_name_or_path=base_model_name_or_path)

    def save(self, out_dir: str, alpha: float, use_rslora: bool, base_model_name_or_path: str | None) -> None:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        save_peft_adapter(self.to_lora_adapter(base_model_name_or_path), out_dir,
                          base_model_name_or_path=base_model_name_or_path, r=self.r, lora_alpha=alpha,
                          use_rslora=use_rslora)
