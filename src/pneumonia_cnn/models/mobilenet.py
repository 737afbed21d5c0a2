"""MobileNetV2 (Sandler et al., 2018): inverted residuals with linear bottlenecks, ~2.2M params."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import InputConv2d, register_model


def conv_bn_act(in_channels, out_channels, kernel=3, stride=1, groups=1, first=False):
    conv = (InputConv2d if first else nn.Conv2d)(in_channels, out_channels, kernel, stride, kernel // 2,
                                                 groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        layers = [conv_bn_act(in_channels, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    feature_layers = ("features.7", "features.14", "features.18")
    gradcam_layer = "features.18"

    def __init__(self, in_channels=3, width_mult=1.0, dropout=0.2):
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1)]
        channels = int(32 * width_mult)
        last = max(1280, int(1280 * width_mult))
        features = [conv_bn_act(in_channels, channels, 3, 2, first=True)]
        for expansion, out, repeats, stride in settings:
            out = int(out * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
                channels = out
        features.append(conv_bn_act(channels, last, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(last, 1)

    def forward(self, x):
        return self.head(self.dropout(torch.flatten(self.pool(self.features(x)), 1))).squeeze(1)


@register_model("mobilenet_v2", "MobileNetV2, efficient mobile-size network (2.2M params)")
def mobilenet_v2(in_channels=3, image_size=(224, 224), width_mult=1.0, dropout=0.2):
    return MobileNetV2(in_channels, width_mult, dropout)
