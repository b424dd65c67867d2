"""A Vision Transformer (Dosovitskiy et al. 2021), whose patch tokens can be dropped: small for CIFAR-size images,
or ViT-S/16 and ViT-B/16 at 224 px.

MSN masks an anchor view by dropping a random share of its patch tokens before the encoder (Assran et al.
2022, Sec. 3): ``forward(x, keep)`` encodes only the tokens listed in ``keep``. Positions are fixed 2-D
sine-cosine embeddings (as MAE's), computed for the patch grid of each input, so global and local views of
any size share the encoder. The feature is the class token after the final LayerNorm. Every LayerNorm takes
``ln_eps``: torch's default 1e-5, or DeiT's 1e-6, which MSN's and ExCB's code use (``model.vit_ln_eps``).
"""
from __future__ import annotations

import torch
from torch import nn


#: (patch, dim, depth, heads) of the named sizes: ViT-S/16 and ViT-B/16 as in DeiT (Touvron et al. 2021) and MSN
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {"vit_s16": (16, 384, 12, 6), "vit_b16": (16, 768, 12, 12)}


def sincos_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """[height * width, dim]: a quarter of the channels sin(y w), cos(y w), sin(x w), cos(x w) each,
    w = 10000^(-i / (dim / 4)), the fixed 2-D embedding of MAE (He et al. 2022)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    angles_y, angles_x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    embedding = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    return nn.functional.pad(embedding, (0, dim - 4 * quarter)).float()


class VisionTransformer(nn.Module):
    """Patch embedding, a class token, ``depth`` pre-norm transformer blocks and a final LayerNorm."""

    supports_token_drop = True

    def __init__(self, in_channels: int, patch: int = 4, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, ln_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the ViT token dimension {dim} is not a multiple of its {heads} heads")
        self.patch = patch
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True, layer_norm_eps=ln_eps)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.feature_dim = dim
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim]: the patch tokens with their positions, N = (H / patch) * (W / patch)."""
        patches = self.patch_embed(x)
        positions = sincos_positions(patches.shape[2], patches.shape[3], patches.shape[1]).to(patches)
        return patches.flatten(2).transpose(1, 2) + positions

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The class token's feature [B, dim]; ``keep`` [B, n] (token indices): encode only those tokens."""
        tokens = self.tokens(x)
        if keep is not None:
            tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.norm(self.blocks(tokens))[:, 0]
