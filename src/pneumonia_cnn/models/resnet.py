"""ResNet-18/34 (He et al., 2016) with a stem that takes gray or RGB input, plus a narrow ResNet for CPUs."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import InputConv2d, register_model


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    feature_layers = ("layer2", "layer3", "layer4")
    gradcam_layer = "layer4"

    def __init__(self, blocks, in_channels=3, width=64, dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(InputConv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, previous = [], width
        for index, count in enumerate(blocks):
            channels = width * 2 ** index
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(previous if i == 0 else channels, channels,
                                                     stride if i == 0 else 1) for i in range(count)]))
            previous = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)  # each residual block starts as identity

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(self.dropout(torch.flatten(self.pool(x), 1))).squeeze(1)


@register_model("resnet18", "ResNet-18 (11.2M params), gray-capable stem")
def resnet18(in_channels=3, image_size=(224, 224), width=64, dropout=0.0):
    return ResNet((2, 2, 2, 2), in_channels, width, dropout)


@register_model("resnet34", "ResNet-34 (21.3M params), gray-capable stem")
def resnet34(in_channels=3, image_size=(224, 224), width=64, dropout=0.0):
    return ResNet((3, 4, 6, 3), in_channels, width, dropout)


@register_model("resnet18_narrow", "ResNet-18 at a quarter width (0.7M params): fast on CPUs")
def resnet18_narrow(in_channels=3, image_size=(224, 224), width=16, dropout=0.0):
    return ResNet((2, 2, 2, 2), in_channels, width, dropout)
