"""The tutorial's Keras ``Sequential`` CNN, exactly, and ``seed_bn``, its modern sibling."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import InputConv2d, register_model


def _conv_out(size: int) -> int:
    return (size - 2) // 2  # 3x3 'valid' conv, then 2x2 max-pool (floor)


class SeedCNN(nn.Module):
    """Conv2D(32)→MaxPool→Conv2D(64)→MaxPool→Conv2D(128)→MaxPool→Flatten→Dense(128)→Dense(1).

    Initialised as Keras does (Glorot-uniform kernels, zero biases). The flatten is channel-first (PyTorch);
    the Keras importer reorders the first Dense layer's rows from Keras' (h, w, c) order.
    """
    gradcam_layer = "conv3"
    feature_layers = ("conv2", "conv3", "fc1")

    def __init__(self, in_channels: int = 3, image_size=(224, 224)):
        super().__init__()
        height, width = image_size
        for _ in range(3):
            height, width = _conv_out(height), _conv_out(width)
        if height < 1 or width < 1:
            raise ValueError(f"input {image_size} is too small for the seed model (needs at least 22x22)")
        self.conv1 = InputConv2d(in_channels, 32, 3)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(64, 128, 3)
        self.pool3 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128 * height * width, 128)
        self.fc2 = nn.Linear(128, 1)
        self.relu = nn.ReLU()
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        # ReLU after the max-pool equals Keras' ReLU before it (both are monotone, ties resolve alike) and
        # touches a quarter of the values, so training is faster
        x = self.relu(self.pool1(self.conv1(x)))
        x = self.relu(self.pool2(self.conv2(x)))
        x = self.relu(self.pool3(self.conv3(x)))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x).squeeze(1)  # logits; sigmoid is applied by the loss and by inference


@register_model("seed", "the tutorial's Keras CNN exactly (3x Conv/MaxPool, Flatten, Dense 128, sigmoid)")
def seed(in_channels=3, image_size=(224, 224)):
    return SeedCNN(in_channels, image_size)


def conv_bn(in_channels, out_channels, first=False):
    conv = (InputConv2d if first else nn.Conv2d)(in_channels, out_channels, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SeedBN(nn.Module):
    """The tutorial's CNN made modern: two conv-BN-ReLU per stage, more filters, global pooling, dropout."""
    feature_layers = ("stage2", "stage3", "stage4")

    def __init__(self, in_channels=3, image_size=(224, 224), width: int = 32, dropout: float = 0.3):
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        stages, previous = [], in_channels
        for index, channels in enumerate(widths):
            stages.append(nn.Sequential(conv_bn(previous, channels, first=index == 0), conv_bn(channels, channels),
                                        nn.MaxPool2d(2)))
            previous = channels
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gradcam_layer = "stage4.1.0"
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, 1)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.head(self.dropout(torch.flatten(self.pool(x), 1))).squeeze(1)


@register_model("seed_bn", "the tutorial's CNN with batch norm, dropout and global pooling (~1.2M params)")
def seed_bn(in_channels=3, image_size=(224, 224), width=32, dropout=0.3):
    return SeedBN(in_channels, image_size, width, dropout)
