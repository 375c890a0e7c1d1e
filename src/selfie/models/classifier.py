"""The finetuning networks (SPEC 2) and the transfer of pretrained weights into them.

- head "resnet50": the preset's ResNet v2 on whole images. Stem and stages 1-3 come from P;
  stage 4, the final norm and the classifier start from the standard initialisation.
- head "attention": the paper's "ResNet-36 + attention pooling" (Table 2). All of P (stem,
  stages 1-3, final BN-ReLU) maps the image to a stage-3 feature map; A, with its
  pretrained weights, pools the map's positions into u; a linear classifier reads u.
  Positions on that map: each feature-map cell takes the pretrained embedding of the
  patch-grid cell it lies in (a 32-px image gives an 8x8 map over the 4x4 patch grid, so
  each patch position covers 2x2 map cells). A's inputs are thus laid out as in pretraining.

Transfers are `load_state_dict` calls whose missing and unexpected keys are asserted to be
exactly the expected sets; anything else is a checkpoint of another architecture.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from selfie.config import Config
from selfie.errors import UserError
from selfie.models.attention_pool import AttentionPool
from selfie.models.position import PositionEmbedding
from selfie.models.resnet_v2 import ResNetV2

HEADS = ("resnet50", "attention")


class AttentionClassifier(nn.Module):
    """P's trunk -> stage-3 map -> A over its positions -> linear classifier. The parts carry
    the names they have in `Selfie`, so its state dict loads as it is."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        m, d = config.model, config.data
        self.patch_net = ResNetV2(m, num_stages=3)
        dim = self.patch_net.out_dim
        self.pool = AttentionPool(
            dim, m.attn_heads, m.attn_intermediate, m.attn_layers, m.attn_dropout
        )
        self.position = PositionEmbedding(d.grid, dim, m.position)
        self.grid = d.grid
        self.head = nn.Linear(dim, d.num_classes)

    def map_positions(self, height: int, width: int) -> torch.Tensor:
        """(height * width, D): each map cell gets its patch-grid cell's embedding."""
        table = self.position().reshape(self.grid, self.grid, -1).permute(2, 0, 1)
        upsampled = F.interpolate(table[None], size=(height, width), mode="nearest")[0]
        return upsampled.flatten(1).transpose(0, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): u, A's summary of the stage-3 map."""
        fmap = self.patch_net.forward_features(images)
        fmap = torch.relu(self.patch_net.norm(fmap))  # (B, D, h, w), P's final BN-ReLU
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)
        tokens = tokens + self.map_positions(*fmap.shape[2:]).to(tokens.dtype)
        return self.pool(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) logits."""
        return self.head(self.features(images))


def build_classifier(config: Config, head: str) -> nn.Module:
    if head == "resnet50":
        return ResNetV2(config.model, num_stages=4, num_classes=config.data.num_classes)
    if head == "attention":
        return AttentionClassifier(config)
    raise UserError(f"unknown head '{head}'; choose one of: {', '.join(HEADS)}")


def _load_exact(
    model: nn.Module,
    source: Mapping[str, torch.Tensor],
    expected_missing: set[str],
    origin: str,
) -> None:
    """load_state_dict(strict=False), then insist the key sets are exactly what we expect."""
    own = model.state_dict()
    wrong_shape = [k for k, v in source.items() if k in own and own[k].shape != v.shape]
    if wrong_shape:
        raise UserError(
            f"{origin} is from another architecture: shapes differ for "
            f"{', '.join(wrong_shape[:5])}; use the preset and --set values it was trained with"
        )
    result = model.load_state_dict(dict(source), strict=False)
    # BatchNorm fills in an absent num_batches_tracked itself, so it is never reported missing.
    expected_missing = {k for k in expected_missing if not k.endswith("num_batches_tracked")}
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    if missing != expected_missing or unexpected:
        extra = sorted(missing ^ expected_missing)[:5] + sorted(unexpected)[:5]
        raise UserError(
            f"{origin} is from another architecture: mismatching keys {', '.join(extra)}; "
            "use the preset and --set values it was trained with"
        )


def transfer_pretrained(
    model: nn.Module, head: str, selfie_state: Mapping[str, torch.Tensor], origin: str
) -> None:
    """Load a pretrained `Selfie` state dict into a finetuning network built by
    `build_classifier`. resnet50: the `patch_net.` stem and stages 1-3 only (P's final norm
    has P's width, not stage 4's); attention: P, A and the positions, all but the head."""
    if not any(k.startswith("patch_net.") for k in selfie_state):
        raise UserError(f"{origin} holds no Selfie patch network (no 'patch_net.' weights)")
    own = model.state_dict()
    if head == "resnet50":
        source = {
            k.removeprefix("patch_net."): v
            for k, v in selfie_state.items()
            if k.startswith(("patch_net.stem.", "patch_net.stages."))
        }
        fresh = ("stages.3.", "norm.", "head.")
        _load_exact(model, source, {k for k in own if k.startswith(fresh)}, origin)
    else:
        _load_exact(model, selfie_state, {k for k in own if k.startswith("head.")}, origin)
