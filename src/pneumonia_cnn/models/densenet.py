"""DenseNet-121 (Huang et al., 2017), the architecture of CheXNet (Rajpurkar et al., 2017)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import InputConv2d, register_model


class DenseLayer(nn.Module):
    def __init__(self, in_channels, growth, bottleneck=4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        out = self.conv1(F.relu(self.norm1(features)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([features, out], 1)


def transition(in_channels, out_channels):
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    feature_layers = ("block2", "block3", "final")
    gradcam_layer = "final"

    def __init__(self, in_channels=3, growth=32, blocks=(6, 12, 24, 16), stem=64, dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(InputConv2d(in_channels, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        channels = stem
        for index, count in enumerate(blocks):
            block = nn.Sequential(*[DenseLayer(channels + i * growth, growth) for i in range(count)])
            setattr(self, f"block{index + 1}", block)
            channels += count * growth
            if index < len(blocks) - 1:
                setattr(self, f"transition{index + 1}", transition(channels, channels // 2))
                channels //= 2
        self.num_blocks = len(blocks)
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, 1)

    def forward(self, x):
        x = self.stem(x)
        for index in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{index}")(x)
            if index < self.num_blocks:
                x = getattr(self, f"transition{index}")(x)
        x = self.final(x)
        return self.head(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))).squeeze(1)


@register_model("densenet121", "DenseNet-121, the CheXNet architecture (7.0M params)")
def densenet121(in_channels=3, image_size=(224, 224), dropout=0.0):
    return DenseNet(in_channels, 32, (6, 12, 24, 16), 64, dropout)
