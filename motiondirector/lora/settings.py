"""LoRA hyper-parameters and the PEFT weight layout, without importing peft.

The package format and the catalog only need these; keeping peft (seconds to import) out of them
keeps `motiondirector catalog ...` fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig


@dataclass(frozen=True)
class LoraSettings:
    """Hyper-parameters of one adapter. alpha None means alpha = rank (scale factor 1)."""

    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.1

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def peft_config(self, targets: list[str]) -> LoraConfig:
        from peft import LoraConfig

        if not targets:
            raise ValueError("no LoRA target modules given")
        # Exact module names: peft matches a target as the full name or a dotted suffix of it.
        return LoraConfig(r=self.rank, lora_alpha=self.effective_alpha, lora_dropout=self.dropout,
                          target_modules=list(targets), init_lora_weights="gaussian", bias="none")


def state_dict_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names present in a PEFT-layout state dict, in key order."""
    return list(dict.fromkeys(key.rsplit(".lora_", 1)[0] for key in state))
