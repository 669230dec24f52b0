"""Stage 1 (optional): supervised fine-tuning / cold start.

Next-token cross-entropy on response tokens only; prompt, image and padding tokens are masked
(R1V3's cold start on rejection-sampled traces; R1V's iterative SFT).
"""
from __future__ import annotations

from ..losses import sft_loss, shift_for_causal_lm
from .common import PolicyModule


class SFTModule(PolicyModule):
    """Supervised fine-tuning on ``response`` targets.

    Args: see ``PolicyModule``.
    """

    def training_step(self, batch, batch_idx):
        out = self.model(**self.model_inputs(batch))
        logits, labels = shift_for_causal_lm(out.logits, batch["labels"])  # [B, T-1, V], [B, T-1]
        loss, stats = sft_loss(logits, labels)
        n = len(batch["records"])
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=n)
        self.log("train/tokens", stats["tokens"].float(), batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=n)
        self.log("train/tokens_per_s", self._throughput(int(batch["attention_mask"].sum())), batch_size=n)
        return loss
