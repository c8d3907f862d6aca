"""Kronecker-sparse models in plain PyTorch, the way user code writes them.

Nothing here imports ksfx: these modules stand for code ksfx has never seen. Each KS
factor is computed the way public Monarch-style code does it: reshape the input into
blocks, move the block index to the front, one ``bmm`` with a ``(a*d, b, c)`` weight,
then the inverse reshuffle. ``torch.compile(model, backend="ksfx")`` has to recognise
these graphs on its own.

Conventions (as in ksfx): a factor with pattern ``(a, b, c, d)`` is the
``(a*b*d, a*c*d)`` matrix with support ``I_a ⊗ 1_{b×c} ⊗ I_d``. A chain
``W = K_1 @ … @ K_L`` is listed **leftmost first**, so the *last* pattern of a list is
the first one applied to the input (``y = x @ W.T``).

The paper's ViT-S/16 layers ("Fast Inference with Kronecker-Sparse Matrices", Gonon et
al. 2024) are usually quoted in application order; in leftmost-first order they read:

=========  ==========================  ===========================  ==========
layer      applied first               applied second               widths
=========  ==========================  ===========================  ==========
Q, K, V    (2, 48, 192, 1): 384 → 96   (1, 192, 48, 2): 96 → 384     384 → 384
MLP up     (6, 64, 64, 1): 384 → 384   (1, 768, 192, 2): 384 → 1536  384 → 1536
MLP down   (6, 64, 256, 1): 1536 → 384 (1, 128, 128, 3): 384 → 384  1536 → 384
=========  ==========================  ===========================  ==========
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Pattern = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- KS layers
def chain_widths(patterns: Sequence[Pattern]) -> tuple[int, int]:
    """``(in_features, out_features)`` of a leftmost-first chain; ValueError if widths differ."""
    patterns = [tuple(int(v) for v in p) for p in patterns]
    if not patterns or any(len(p) != 4 or min(p) < 1 for p in patterns):
        raise ValueError(f"a KS chain needs one or more positive (a, b, c, d) patterns, got {patterns}")
    for k in range(len(patterns) - 1):
        (a1, _, c1, d1), (a2, b2, _, d2) = patterns[k], patterns[k + 1]
        if a1 * c1 * d1 != a2 * b2 * d2:
            raise ValueError(
                f"patterns {k} {patterns[k]} and {k + 1} {patterns[k + 1]} do not chain: "
                f"a*c*d = {a1 * c1 * d1} != a*b*d = {a2 * b2 * d2}"
            )
    a, _, c, d = patterns[-1]
    a0, b0, _, d0 = patterns[0]
    return a * c * d, a0 * b0 * d0


def ks_factor_bmm(x: torch.Tensor, weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """One factor, batch-first: ``x`` of shape ``(n, a*c*d)`` → ``(n, a*b*d)``.

    ``weight[α*d + δ, β, γ]`` holds the factor's value at row ``(α, β, δ)``, column ``(α, γ, δ)``.
    """
    a, b, c, d = pattern
    n = x.shape[0]
    blocks = x.reshape(n, a, c, d).permute(1, 3, 0, 2).reshape(a * d, n, c)
    out = torch.bmm(blocks, weight.transpose(1, 2))
    return out.reshape(a, d, n, b).permute(2, 0, 3, 1).reshape(n, a * b * d)


class BmmKSLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W = K_1 @ … @ K_L`` (``patterns`` leftmost first).

    Factor ``k`` is stored as ``weights[k]`` of shape ``(a*d, b, c)``, the layout bmm
    code keeps its block weights in. Each block is initialised like ``nn.Linear`` with
    fan-in ``c``.
    """

    def __init__(self, patterns: Sequence[Pattern], bias: bool = True) -> None:
        super().__init__()
        self.patterns = tuple(tuple(int(v) for v in p) for p in patterns)
        self.in_features, self.out_features = chain_widths(self.patterns)
        self.weights = nn.ParameterList()
        for a, b, c, d in self.patterns:
            bound = 1.0 / math.sqrt(c)
            self.weights.append(nn.Parameter(torch.empty(a * d, b, c).uniform_(-bound, bound)))
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias = nn.Parameter(torch.empty(self.out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def apply_chain(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` over the last dimension, without the bias."""
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        for pattern, weight in zip(reversed(self.patterns), reversed(list(self.weights)), strict=True):
            h = ks_factor_bmm(h, weight, pattern)  # the rightmost factor acts first
        return h.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_chain(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, patterns={list(self.patterns)}, bias={self.bias is not None}"
        )


@torch.no_grad()
def dense_weight(layer: BmmKSLinear) -> torch.Tensor:
    """The dense ``(out, in)`` matrix ``W`` of ``layer``, found by applying it to the identity."""
    eye = torch.eye(layer.in_features, dtype=layer.weights[0].dtype, device=layer.weights[0].device)
    return layer.apply_chain(eye).T.contiguous()


def monarch_patterns(in_features: int, out_features: int, nblocks: int) -> tuple[Pattern, Pattern]:
    """Monarch-like 2-factor chain, leftmost first: block-diagonal, then the strided factor.

    Applied first: ``(m, mid/m, in/m, 1)`` (``m`` diagonal blocks, ``mid = min(in, out)``);
    then ``(1, out/m, mid/m, m)`` (the same blocks conjugated by the stride permutation).
    """
    mid = min(in_features, out_features)
    if in_features % nblocks or out_features % nblocks:
        raise ValueError(f"nblocks={nblocks} must divide in_features={in_features} and out_features={out_features}")
    m = nblocks
    return (1, out_features // m, mid // m, m), (m, mid // m, in_features // m, 1)


# ----------------------------------------------------------------------------- KS-ViT
@dataclass(frozen=True)
class ViTConfig:
    """ViT with KS Q/K/V and MLP projections (paper patterns, leftmost first)."""

    image_size: int = 224
    patch_size: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    num_classes: int = 1000
    qkv: tuple[Pattern, ...] = ((1, 192, 48, 2), (2, 48, 192, 1))
    mlp_up: tuple[Pattern, ...] = ((1, 768, 192, 2), (6, 64, 64, 1))
    mlp_down: tuple[Pattern, ...] = ((1, 128, 128, 3), (6, 64, 256, 1))

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        up_in, hidden = chain_widths(self.mlp_up)
        down_in, down_out = chain_widths(self.mlp_down)
        widths = {"qkv": chain_widths(self.qkv), "mlp_up": (up_in, hidden), "mlp_down": (down_in, down_out)}
        expected = {"qkv": (self.dim, self.dim), "mlp_up": (self.dim, hidden), "mlp_down": (hidden, self.dim)}
        if widths != expected:
            raise ValueError(f"KS chain widths {widths} do not fit dim={self.dim}: expected {expected}")

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


#: KS-ViT-S/16 as in the paper.
VIT_S16 = ViTConfig()
#: A two-block ViT with the same KS layers on 64×64 images (17 tokens), for CPU runs and tests.
VIT_SMALL = ViTConfig(image_size=64, depth=2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv: Sequence[Pattern], causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = (BmmKSLinear(qkv) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=self.causal
        )
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class KSMLP(nn.Module):
    def __init__(self, up: Sequence[Pattern], down: Sequence[Pattern]) -> None:
        super().__init__()
        self.up, self.down = BmmKSLinear(up), BmmKSLinear(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv)
        self.mlp = KSMLP(cfg.mlp_up, cfg.mlp_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class KSViT(nn.Module):
    """Images ``(batch, 3, H, W)`` → logits ``(batch, num_classes)``."""

    def __init__(self, cfg: ViTConfig = VIT_S16) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


# ----------------------------------------------------------------------------- GPT-2 with KS MLPs
@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 with KS MLPs (Monarch-like, 4 blocks); attention projections stay dense."""

    vocab_size: int = 50257
    seq_len: int = 1024
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_up: tuple[Pattern, ...] = monarch_patterns(1024, 4096, 4)
    mlp_down: tuple[Pattern, ...] = monarch_patterns(4096, 1024, 4)

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        up_in, hidden = chain_widths(self.mlp_up)
        down_in, down_out = chain_widths(self.mlp_down)
        if (up_in, down_in, down_out) != (self.dim, hidden, self.dim):
            raise ValueError(f"KS MLP widths {up_in}->{hidden} and {down_in}->{down_out} do not fit dim={self.dim}")


#: GPT-2 medium (355M dense; the KS MLPs hold a quarter of the dense MLP weights).
GPT2_MEDIUM = GPT2Config()
#: Two layers of width 256 on 128 tokens, for CPU runs and tests.
GPT2_SMALL = GPT2Config(
    vocab_size=1024,
    seq_len=128,
    dim=256,
    depth=2,
    heads=4,
    mlp_up=monarch_patterns(256, 1024, 4),
    mlp_down=monarch_patterns(1024, 256, 4),
)


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.heads = cfg.heads
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.mlp = KSMLP(cfg.mlp_up, cfg.mlp_down)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.c_attn(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class KSGPT2(nn.Module):
    """Token ids ``(batch, seq)`` → logits ``(batch, seq, vocab)`` (tied input/output embedding)."""

    def __init__(self, cfg: GPT2Config = GPT2_MEDIUM) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.dim)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


# ----------------------------------------------------------------------------- factories
def vit_inputs(cfg: ViTConfig, batch: int, device=None, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float32)
    return (images.to(device=device, dtype=dtype),)


def gpt2_inputs(cfg: GPT2Config, batch: int, device=None, seed: int = 0) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen).to(device),)


def small_vit(cfg: ViTConfig = VIT_SMALL, batch: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Seeded KS-ViT in eval mode and its inputs; ``python -m ksfx inspect examples.ks_models:small_vit``."""
    torch.manual_seed(0)
    return KSViT(cfg).eval(), vit_inputs(cfg, batch)


def small_gpt2(cfg: GPT2Config = GPT2_SMALL, batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Seeded GPT-2 in eval mode and its inputs; ``python -m ksfx inspect examples.ks_models:small_gpt2``."""
    torch.manual_seed(0)
    return KSGPT2(cfg).eval(), gpt2_inputs(cfg, batch)
