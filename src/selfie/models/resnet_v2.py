"""Pre-activation ResNet v2 (He et al. 2016): batch norm and ReLU at the start of each unit.

One implementation serves both networks of the method (SPEC 2):
- P, the patch network: `ResNetV2(cfg, num_stages=3)`, i.e. stem + stages 1-3 + final
  BN-ReLU + global average pooling, one D-vector per patch;
- the finetuning ResNet-50: `ResNetV2(cfg, num_stages=4, num_classes=K)`.
Both name their parts `stem`, `stages.{i}`, `norm`, `head`, so the transfer from P is a
`load_state_dict` of the `stem.` and `stages.0-2.` keys.
"""

from __future__ import annotations

import torch
from torch import nn

from selfie.config import ModelConfig


class StridedPointwise(nn.Conv2d):
    """A bias-free 1x1 convolution with stride s, computed as the 1x1 convolution of every
    s-th pixel: the same function, weights and state-dict keys as nn.Conv2d(in, out, 1, s).

    Written so because torch 2.13's oneDNN kernels crash (a segfault or "double free" in the
    weight gradient) on a strided 1x1 convolution of channels_last input with an odd batch,
    two or more threads and AVX-512, e.g. 8 -> 8 channels at batch 3
    (tests/test_models.py::test_odd_batches_train_without_crashing)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(in_ch, out_ch, 1, bias=False)
        self.step = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, :: self.step, :: self.step] if self.step > 1 else x)


class PreActUnit(nn.Module):
    """The part both unit types share: the pre-activation BN-ReLU and the shortcut (a 1x1
    projection of the pre-activated input when the shape changes, as in the v2 paper and
    TF-slim). Subclasses define `residual`, applied to the pre-activated input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.shortcut = (
            StridedPointwise(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        )

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return self.residual(pre) + skip


class BasicUnit(PreActUnit):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(in_ch, out_ch, stride)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn2(self.conv1(pre))))


class BottleneckUnit(PreActUnit):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1 with a 4x wider output."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(in_ch, out_ch, stride)
        mid = out_ch // 4
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return self.conv3(torch.relu(self.bn3(out)))


def make_stem(cfg: ModelConfig, in_channels: int = 3) -> nn.Sequential:
    """No BN or ReLU after the stem conv: the first pre-activation unit applies them (v2)."""
    if cfg.stem == "cifar":  # SPEC 7: one 3x3 conv, stride 1, no max-pool for 32-px inputs
        return nn.Sequential(nn.Conv2d(in_channels, cfg.stem_width, 3, 1, 1, bias=False))
    return nn.Sequential(
        nn.Conv2d(in_channels, cfg.stem_width, 7, 2, 3, bias=False),
        nn.MaxPool2d(3, 2, 1),
    )


class ResNetV2(nn.Module):
    def __init__(self, cfg: ModelConfig, num_stages: int = 4, num_classes: int | None = None):
        super().__init__()
        unit = BottleneckUnit if cfg.block == "bottleneck" else BasicUnit
        self.stem = make_stem(cfg)
        stages = []
        in_ch = cfg.stem_width
        for i in range(num_stages):
            out_ch = cfg.widths[i]
            units = [
                unit(in_ch if j == 0 else out_ch, out_ch, 2 if (i > 0 and j == 0) else 1)
                for j in range(cfg.layers[i])
            ]
            stages.append(nn.Sequential(*units))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.norm = nn.BatchNorm2d(in_ch)  # the final BN-ReLU a pre-activation net needs
        self.out_dim = in_ch
        self.head = nn.Linear(in_ch, num_classes) if num_classes is not None else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor, num_stages: int | None = None) -> torch.Tensor:
        """(B, C, H, W) -> the raw feature map after `num_stages` stages (no final norm)."""
        x = self.stem(x)
        for stage in self.stages[:num_stages]:
            x = stage(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim): final BN-ReLU, then the mean over positions."""
        return torch.relu(self.norm(self.forward_features(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim) pooled features, or (B, K) logits with a head."""
        x = self.features(x)
        return x if self.head is None else self.head(x)
