"""Training metrics: embedding statistics of a batch, their means over ranks, and where they go
(TensorBoard scalars, the tqdm bar, a log line every train.log_every steps).

Log lines and the bar share the terminal: while the bar is shown, console log handlers write
through tqdm (tqdm.contrib.logging.logging_redirect_tqdm), so a line never lands inside the bar.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hardneg.train import distributed as dist_util

log = logging.getLogger("hardneg.train")

# Per-rank values averaged over the ranks before they are shown (loss: identical on every rank
# with cross-device negatives; the similarities are per-rank batch means).
GLOBAL_KEYS = ("loss", "pos_sim", "hardest_neg_sim")


def embedding_stats(
    q_BD: Tensor, t_BD: Tensor, h_ND: Tensor | None, target_ids: Tensor, hard_negative_ids
) -> dict:
    """Mean positive cosine and mean hardest-negative cosine over this rank's batch of embeddings
    (in-batch targets and hard negatives as candidates, false negatives excluded).

    q_BD queries, t_BD their targets, h_ND (N = B*M) hard negatives or None; target_ids (B,),
    hard_negative_ids (B, M) or None."""
    c_ND = t_BD if h_ND is None else torch.cat([t_BD, h_ND])
    s_BN = q_BD @ c_ND.T
    B = q_BD.shape[0]
    neg_BN = torch.ones_like(s_BN, dtype=torch.bool)
    neg_BN[torch.arange(B), torch.arange(B)] = False
    cand_ids = target_ids
    if h_ND is not None and hard_negative_ids is not None:
        cand_ids = torch.cat([cand_ids, hard_negative_ids.reshape(-1)])
    neg_BN &= cand_ids[None, :] != target_ids[:, None]
    pos = s_BN.diagonal().mean()
    hardest = s_BN.masked_fill(~neg_BN, -2.0).max(dim=1).values
    valid = neg_BN.any(dim=1)
    hard = hardest[valid].mean() if bool(valid.any()) else torch.tensor(float("nan"))
    return {"pos_sim": float(pos), "hardest_neg_sim": float(hard)}


class MetricsLog:
    """Adds the ranks' means ("global_<key>") to each step's metrics; on rank 0 writes them to
    TensorBoard, the bar and (every log_every steps) the log. Use as a context manager."""

    def __init__(
        self, out: Path, *, total_steps: int, initial_step: int, log_every: int, bar: bool
    ) -> None:
        self.main = dist_util.is_main()
        self.total_steps = total_steps
        self.log_every = log_every
        self.writer = SummaryWriter(str(out / "tensorboard")) if self.main else None
        self.show_bar = self.main and bar
        self.bar = tqdm(
            total=total_steps, initial=initial_step, disable=not self.show_bar, desc="train"
        )
        self._stack = ExitStack()

    def __enter__(self) -> MetricsLog:
        if self.show_bar:
            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def record(self, step: int, metrics: dict) -> None:
        """Every rank calls it (the means are collective); metrics gains global_* keys."""
        mean = dist_util.all_reduce(torch.tensor([metrics[k] for k in GLOBAL_KEYS]), "mean")
        metrics.update({f"global_{k}": v for k, v in zip(GLOBAL_KEYS, mean.tolist(), strict=True)})
        if self.writer is None:
            return
        for k in GLOBAL_KEYS:
            self.writer.add_scalar(f"train/{k}", metrics[f"global_{k}"], step)
        self.writer.add_scalar("train/lr", metrics["lr"], step)
        self.writer.add_scalar("train/samples_per_s", metrics["samples_per_s"], step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['global_loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if step % self.log_every == 0 or step == self.total_steps:
            log.info(
                "step %d/%d loss %.4f pos %.3f hardest-neg %.3f lr %.2e %.1f samples/s",
                step,
                self.total_steps,
                metrics["global_loss"],
                metrics["global_pos_sim"],
                metrics["global_hardest_neg_sim"],
                metrics["lr"],
                metrics["samples_per_s"],
            )
