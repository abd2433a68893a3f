"""Model zoo. Each model takes in_channels and num_classes from the dataset;
config files choose the class through `_target_`.

    TutorialCNN   the original experiment's net (the default)
    WideCNN       three conv blocks with batch norm
    ResNet18      ResNet-18 for 32x32 images (3x3 stem, no max-pool)
    Fast94Net     the fast CIFAR-10 net: patch-whitening stem set from the data
    TimmModel     any timm model by name (model=timm model.name=...)
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnexp.errors import ConfigError


class TutorialCNN(nn.Module):
    """The PyTorch CIFAR-10 tutorial net, layer for layer (62,006 parameters
    for 3x32x32 inputs and 10 classes). Expects 32x32 images."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class WideCNN(nn.Module):
    """Three conv blocks (width, 2*width, 4*width channels) with batch norm,
    global average pooling and dropout. Works for any image size >= 8."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 4 * width),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------- ResNet-18 (CIFAR variant)
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # match the residual's shape
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 as used on CIFAR: a 3x3 stride-1 stem without max-pool (the
    ImageNet stem would shrink 32x32 images to 1x1 before the last stage)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# ----------------------------------------------------------------- the fast CIFAR-10 net
class PatchWhitening(nn.Module):
    """A frozen 2x2 convolution whose filters whiten the image patches: the
    eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), and
    their negatives (so a following GELU keeps both signs). Set once from
    training images with `fit`; a bias stays trainable."""

    def __init__(self, in_channels: int, eps: float = 5e-4):
        super().__init__()
        n = in_channels * 4
        self.eps = eps
        self.register_buffer("weight", torch.zeros(2 * n, in_channels, 2, 2))
        self.bias = nn.Parameter(torch.zeros(2 * n))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """images: normalised float (N, C, H, W)."""
        c = images.shape[1]
        patches = F.unfold(images.float(), 2).transpose(1, 2).reshape(-1, c * 4).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / patches.shape[0]
        values, vectors = torch.linalg.eigh(cov)
        filters = (vectors / torch.sqrt(values + self.eps)).T.reshape(-1, c, 2, 2).float()
        self.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def _identity_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 convolution whose first c_in filters start as the identity (the rest
    as usual): the net begins close to passing its input through, which trains
    faster in a short schedule."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


def _fast_norm(channels: int, bias_lr_scale: float) -> nn.BatchNorm2d:
    """Batch norm with a fixed unit scale and a trainable shift whose learning
    rate is bias_lr_scale times the rest (read by engine/optimizers.py), and
    running statistics that follow the last few batches (momentum 0.4)."""
    norm = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    norm.weight.requires_grad_(False)
    norm.bias.lr_scale = float(bias_lr_scale)
    return norm


def _fast_block(c_in: int, c_out: int, bias_lr_scale: float) -> nn.Sequential:
    return nn.Sequential(
        _identity_conv(c_in, c_out), nn.MaxPool2d(2), _fast_norm(c_out, bias_lr_scale), nn.GELU(),
        _identity_conv(c_out, c_out), _fast_norm(c_out, bias_lr_scale), nn.GELU(),
    )


class Fast94Net(nn.Module):
    """The small net of the fastest known CIFAR-10 recipe: patch whitening,
    three blocks (conv, max-pool, batch norm, GELU, conv, batch norm, GELU)
    of `widths` channels, a global max-pool and a bias-free linear head whose
    output is scaled down (1/9) so that early logits stay small. Convolutions
    start identity-like; batch norms keep a unit scale and train their shifts
    at norm_bias_lr_scale times the learning rate."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths=(64, 256, 256), scale: float = 1 / 9,
                 norm_bias_lr_scale: float = 64.0):
        super().__init__()
        self.whiten = PatchWhitening(in_channels)
        w1, w2, w3 = (int(w) for w in widths)
        c_in = self.whiten.out_channels
        self.blocks = nn.Sequential(*(_fast_block(a, b, norm_bias_lr_scale)
                                      for a, b in ((c_in, w1), (w1, w2), (w2, w3))))
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scale = scale

    def fit_to_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images."""
        self.whiten.fit(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.scale


# ----------------------------------------------------------------- timm
def TimmModel(name: str, in_channels: int = 3, num_classes: int = 10) -> nn.Module:  # noqa: N802 - a model
    """Any timm model by name, untrained; timm adapts the stem to in_channels
    and the head to num_classes itself."""
    timm = _timm()
    check_timm_name(name)
    return timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=num_classes)


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs the timm package: pip install 'cnnexp[timm]' (or pip install timm).") \
            from None
    return timm


def check_timm_name(name: str) -> None:
    """A ConfigError naming close matches when timm has no model `name`."""
    timm = _timm()
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
        raise ConfigError(f"model.name={name!r} is not a timm model; {hint}")


# ----------------------------------------------------------------- models named by _target_
def adapt_first_conv(model: nn.Module, in_channels: int) -> str | None:
    """Give a model built for 3-channel images (torchvision's) a first convolution
    taking `in_channels`; returns what was adapted, or None when nothing had to be."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return None
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None, child.padding_mode)
                setattr(parent, name, new)
                return f"its first convolution now takes {in_channels} channels (was {child.in_channels})"
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
