"""The controlled retrieval task of benchmarks/bench_hardness.py: a world where the loss decides.

World. An item is a tuple of A discrete attributes with V values each (A = 4, V = 8: 4096 items);
each (attribute, value) has a random embedding, and the last attribute is weak (its embedding is
scaled down), so items that differ only in it are the hardest negatives. Each modality ("query",
"target") sees an item through its own fixed random two-layer tanh map of [content; nuisance]:
the content is present but entangled with per-view nuisance noise, like a frozen pretrained
encoder's features. Test items are attribute combinations never seen in training.

Model and training. A trainable head per side (Linear-ReLU-Linear, L2-normalised output) over the
fixed features; Adam; every step draws `items_per_step` training items with replacement (so
duplicates occur: target ids = item ids mask them), fresh nuisance views for both sides, and, when
asked, M explicit hard negatives per query mined offline: the K training items nearest to it under
the noise-free target features (what mining with the base encoder gives). Negatives can be kept
local to `groups` equal slices of the step (simulated ranks without cross-device gathering).

Evaluation (fixed views per world): every test item's query embedding retrieves among
  hard split:   its positive + every item that differs from it in exactly one attribute,
  random split: its positive + 99 random other items;
and the cosine of the positive, of the 5 most and of the 5 least similar other items of the whole
gallery (LLaVE Table 1's positive / hard / easy similarities).

Legend: B items per step, M hard negatives per query, D embedding dim, F feature dim.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# loss(q_BD, t_BD, h_BMD | None, ids_B, h_ids_BM | None) -> scalar
LossFn = Callable[[Tensor, Tensor, Tensor | None, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class WorldConfig:
    attributes: int = 4
    values: int = 8
    weak_scale: float = 0.4  # scale of the last attribute's embedding (the hard one)
    attr_dim: int = 8  # embedding size per attribute
    nuisance_dim: int = 16
    noise: float = 1.0  # scale of the per-view nuisance input
    hidden_dim: int = 128  # of the fixed random map
    feature_dim: int = 64
    test_fraction: float = 0.2
    mined_k: int = 8  # offline-mined hard negatives kept per training item
    random_distractors: int = 99


@dataclass(frozen=True)
class RunConfig:
    items_per_step: int = 128
    groups: int = 1  # negatives local to this many equal slices of the step (1: the whole step)
    hard_negatives: int = 0  # M explicit mined hard negatives per query
    steps: int = 1000
    lr: float = 1e-3
    head_hidden: int = 128
    embed_dim: int = 32
    eval_at: tuple[int, ...] = field(default_factory=tuple)  # extra steps to evaluate at


class World:
    """The items, the frozen per-modality feature maps, the split, the mined negatives and the
    fixed evaluation views of one world seed."""

    def __init__(self, cfg: WorldConfig, seed: int):
        self.cfg = cfg
        g = torch.Generator().manual_seed(10_000 + seed)
        A, V, E = cfg.attributes, cfg.values, cfg.attr_dim
        self.values = torch.tensor(list(itertools.product(range(V), repeat=A)))  # (n, A)
        n = self.values.shape[0]
        scale = torch.ones(A, 1, 1)
        scale[-1] = cfg.weak_scale
        self.attr_emb = torch.randn(A, V, E, generator=g) * scale
        in_dim = A * E + cfg.nuisance_dim
        content = self.content(torch.arange(n))
        self.maps = {}
        for side in ("query", "target"):
            w1 = torch.randn(cfg.hidden_dim, in_dim, generator=g) * (2.0 / in_dim**0.5)
            w2 = torch.randn(cfg.feature_dim, cfg.hidden_dim, generator=g) / cfg.hidden_dim**0.5
            # The content's pre-activation is fixed per item: computed once.
            self.maps[side] = (content @ w1[:, : A * E].T, w1[:, A * E :], w2)
        perm = torch.randperm(n, generator=g)
        n_test = int(n * cfg.test_fraction)
        self.test_ids, self.train_ids = perm[:n_test].sort().values, perm[n_test:].sort().values
        self.mined = self._mine()
        # Fixed evaluation views.
        self.eval_query = self.features("query", self.test_ids, g)
        self.eval_target = self.features("target", torch.arange(n), g)
        self.hard_split = torch.cat([self.test_ids[:, None], self.neighbours(self.test_ids)], 1)
        self.random_split = self._random_split(g)

    def content(self, ids: Tensor) -> Tensor:
        vals = self.values[ids]  # (n, A)
        parts = [self.attr_emb[a, vals[:, a]] for a in range(self.cfg.attributes)]
        return torch.cat(parts, dim=1)

    def features(self, side: str, ids: Tensor, g: torch.Generator | None) -> Tensor:
        """Frozen features (n, F) of items seen by one modality; g draws the nuisance view (None:
        the noise-free view)."""
        pre_content, w_nuisance, w2 = self.maps[side]
        pre = pre_content[ids]
        if g is not None and self.cfg.noise:
            nuisance = torch.randn(ids.shape[0], self.cfg.nuisance_dim, generator=g)
            pre = pre + (self.cfg.noise * nuisance) @ w_nuisance.T
        return torch.tanh(pre) @ w2.T

    def neighbours(self, ids: Tensor) -> Tensor:
        """(n, A*(V-1)) ids of the items that differ from each item in exactly one attribute."""
        A, V = self.cfg.attributes, self.cfg.values
        radix = V ** torch.arange(A - 1, -1, -1)
        vals = self.values[ids]
        out = []
        for a in range(A):
            for shift in range(1, V):
                other = vals.clone()
                other[:, a] = (other[:, a] + shift) % V
                out.append((other * radix).sum(1))
        return torch.stack(out, dim=1)

    def _mine(self) -> Tensor:
        """(n, K): per item, the K training items nearest under the noise-free target features
        (rows of test items are unused)."""
        feats = F.normalize(self.features("target", self.train_ids, None), dim=1)
        sim = feats @ feats.T
        sim.fill_diagonal_(-float("inf"))
        top = sim.topk(self.cfg.mined_k, dim=1).indices
        mined = torch.zeros(self.values.shape[0], self.cfg.mined_k, dtype=torch.long)
        mined[self.train_ids] = self.train_ids[top]
        return mined

    def _random_split(self, g: torch.Generator) -> Tensor:
        n, k = self.values.shape[0], self.cfg.random_distractors
        draws = torch.rand(self.test_ids.shape[0], n, generator=g)
        draws[torch.arange(self.test_ids.shape[0]), self.test_ids] = -1.0  # never the positive
        return torch.cat([self.test_ids[:, None], draws.topk(k, dim=1).indices], dim=1)


class Heads(nn.Module):
    """One trainable head per side over the frozen features."""

    def __init__(self, feature_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.sides = nn.ModuleDict(
            {
                side: nn.Sequential(
                    nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim)
                )
                for side in ("query", "target")
            }
        )

    def forward(self, side: str, x: Tensor) -> Tensor:
        return F.normalize(self.sides[side](x), dim=-1)


def evaluate(world: World, heads: Heads) -> dict:
    """P@1 (%) on both splits and the mean cosines of the positive, of the hardest negative, of
    the 5 hardest and of the 5 easiest negatives over the whole gallery."""
    with torch.no_grad():
        q = heads("query", world.eval_query)
        t = heads("target", world.eval_target)
        sim = q @ t.T  # (n_test, n_items)
        rows = torch.arange(q.shape[0])
        out = {}
        for name, split in (("hard", world.hard_split), ("random", world.random_split)):
            scores = sim.gather(1, split)
            # Ties count as misses: a collapsed model must not score (candidate 0 is the positive).
            best_other = scores[:, 1:].max(dim=1).values
            out[f"p1_{name}"] = 100.0 * (scores[:, 0] > best_other).float().mean().item()
        pos = sim[rows, world.test_ids]
        others = sim.clone()
        others[rows, world.test_ids] = float("nan")
        hard = others.nan_to_num(-2.0).topk(5, dim=1).values
        easy = others.nan_to_num(2.0).topk(5, dim=1, largest=False).values
        out["cos_pos"] = pos.mean().item()
        out["cos_hard1"] = hard[:, 0].mean().item()
        out["cos_hard5"] = hard.mean().item()
        out["cos_easy5"] = easy.mean().item()
    return out


def _grouped_loss(loss_fn: LossFn, groups: int, q, t, h, ids, h_ids) -> Tensor:
    """Mean of the loss over `groups` equal slices: negatives local to each slice."""
    if groups == 1:
        return loss_fn(q, t, h, ids, h_ids)
    parts = []
    for sl in torch.arange(q.shape[0]).chunk(groups):
        parts.append(
            loss_fn(
                q[sl],
                t[sl],
                None if h is None else h[sl],
                ids[sl],
                None if h_ids is None else h_ids[sl],
            )
        )
    return torch.stack(parts).mean()


def train(world: World, loss_fn: LossFn, run: RunConfig, seed: int) -> dict:
    """Train the heads with loss_fn; returns the final evaluation, plus "curve" (step, eval) at
    run.eval_at and "final_loss". Deterministic for a seed (with one torch thread)."""
    if run.items_per_step % run.groups:
        raise ValueError(
            f"items_per_step {run.items_per_step} is not a multiple of groups {run.groups}"
        )
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    heads = Heads(world.cfg.feature_dim, run.head_hidden, run.embed_dim)
    opt = torch.optim.Adam(heads.parameters(), lr=run.lr, fused=True)
    train_ids, B, M = world.train_ids, run.items_per_step, run.hard_negatives
    curve = []
    loss = torch.zeros(())
    for step in range(1, run.steps + 1):
        ids = train_ids[torch.randint(len(train_ids), (B,), generator=g)]
        q = heads("query", world.features("query", ids, g))
        t = heads("target", world.features("target", ids, g))
        h = h_ids = None
        if M:
            pick = torch.randint(world.cfg.mined_k, (B, M), generator=g)
            h_ids = world.mined[ids[:, None], pick]
            h = heads("target", world.features("target", h_ids.flatten(), g)).view(B, M, -1)
        loss = _grouped_loss(loss_fn, run.groups, q, t, h, ids, h_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in run.eval_at and step != run.steps:
            curve.append({"step": step, **evaluate(world, heads)})
    final = evaluate(world, heads)
    curve.append({"step": run.steps, **final})
    return {**final, "final_loss": loss.item(), "curve": curve}
