"""Images as a trained model saw them: decoded like the image-folder reader
decodes them (RGB, grey replicated, alpha dropped, bilinear resize), as uint8,
then normalised with the run's data.mean and data.std.

Accepted: PIL images, numpy uint8 arrays (H x W grey, H x W x 1/3/4, or C x H x W), torch
tensors (C x H x W or a batch N x C x H x W; uint8, or float in [0, 1], which
is quantised to uint8 as a decoded image would be), or a list of any of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cnnexp.data import Normalizer
from cnnexp.data.imagefolder import image_array

ACCEPTED = ("PIL images, numpy uint8 arrays (HxW or HxWxC), torch tensors (CxHxW or NxCxHxW; uint8 or float "
            "in [0, 1]) or a list of them")


class Preprocessor:
    """Any accepted images -> the normalised float batch the model was trained on."""

    def __init__(self, mean, std, input_shape: Sequence[int], device: torch.device):
        self.channels, self.height, self.width = (int(v) for v in input_shape)
        self.device = torch.device(device)
        self.normalize = Normalizer(list(mean), list(std), self.channels, self.device)
        # The image-folder reader resizes to a square; other training sizes are taken as they come.
        self.resize = self.height if self.height == self.width else None

    def __call__(self, images) -> torch.Tensor:
        return self.normalize(self.uint8(images).to(self.device))

    # ------------------------------------------------------------ to uint8 (N, C, H, W)
    def uint8(self, images) -> torch.Tensor:
        """The images as training held them: uint8 (N, C, H, W) at the run's size, on the CPU."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if images.dtype == torch.uint8 and tuple(images.shape[1:]) == self.shape:
                return images.cpu()  # already what training held
            return torch.stack([self.one(img) for img in images])
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return torch.stack([self.one(img) for img in images])
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given")
            return torch.stack([self.one(img) for img in images])
        return self.one(images).unsqueeze(0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def one(self, image) -> torch.Tensor:
        """One image -> uint8 (C, H, W) through the reader's own decoding."""
        array = image_array(as_pil(image), self.resize)
        if array.shape[:2] != (self.height, self.width):
            raise ValueError(f"an image of {array.shape[1]}x{array.shape[0]} pixels: the model was trained on "
                             f"{self.width}x{self.height} images and cannot be given other sizes")
        return torch.from_numpy(np.array(array)).permute(2, 0, 1).contiguous()  # a writable copy


def as_pil(image):
    """A PIL image of `image`, so every input goes through the same conversion as a decoded file."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype.is_floating_point:  # [0, 1], as torchvision's ToTensor gives
            tensor = (tensor * 255).round().clamp(0, 255).to(torch.uint8)
        if tensor.dtype != torch.uint8 or tensor.dim() not in (2, 3):
            raise ValueError(f"a tensor of {tensor.dtype} and shape {tuple(tensor.shape)}; give {ACCEPTED}")
        image = tensor.numpy() if tensor.dim() == 2 else tensor.permute(1, 2, 0).numpy()  # CHW -> HWC
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
            image = image.transpose(1, 2, 0)  # C x H x W, as a dataset's arrays often are
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an array of {image.dtype} and shape {image.shape}; give {ACCEPTED}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(image))
    raise ValueError(f"a {type(image).__name__} is not an image; give {ACCEPTED}")
