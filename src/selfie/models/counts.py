"""Parameter counts of the method's networks, built on the meta device (no memory, instant)."""

from __future__ import annotations

import torch
from torch import nn

from selfie.config import Config
from selfie.models.classifier import AttentionClassifier
from selfie.models.resnet_v2 import ResNetV2
from selfie.models.selfie import Selfie


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(config: Config) -> dict[str, int]:
    with torch.device("meta"):
        selfie = Selfie(config)
        resnet = ResNetV2(config.model, num_stages=4, num_classes=config.data.num_classes)
        attention = AttentionClassifier(config)
    return {
        "patch_network_P": count(selfie.patch_net),
        "attention_pool_A": count(selfie.pool),
        "position_embeddings": count(selfie.position),
        "selfie_total": count(selfie),
        "finetune_resnet": count(resnet),
        "finetune_attention": count(attention),
    }
