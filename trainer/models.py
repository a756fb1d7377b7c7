"""The models the trainer knows by name: a small CNN and two CIFAR-style ResNets.

Every model takes 3×32×32 images and returns 10 logits. Datasets that are not
natively 3×32×32 (Fashion-MNIST is 1×28×28) are converted by ``data.py``, so
the models never need an ``in_channels`` argument.

=============  ===========  =====================================================
name           parameters   notes
=============  ===========  =====================================================
``simplecnn``   1,143,466   conv32-conv64-pool-conv128-pool, fc 8192→128→10;
                            a CPU can train it; ~4.6 MB of fp32 gradients/step
``resnet18``   11,173,962   torchvision ResNet-18, CIFAR stem
``resnet50``   23,520,842   torchvision ResNet-50, CIFAR stem
=============  ===========  =====================================================

The CIFAR stem: ImageNet ResNets open with a 7×7 stride-2 convolution and a
stride-2 max-pool, which shrink a 32×32 image to 8×8 before the first block.
On CIFAR that throws away most of the image, so (as in He et al. 2016, §4.2,
and most CIFAR code) the first convolution becomes 3×3 stride 1 padding 1 and
the max-pool is removed (replaced by ``nn.Identity``, so the module tree and
state-dict keys stay torchvision's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .names import MODEL_NAMES

__all__ = ["MODELS", "build_model", "count_parameters", "SimpleCNN", "cifar_resnet"]

NUM_CLASSES = 10


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SimpleCNN(nn.Sequential):
    """Three conv blocks and a two-layer classifier: 1,143,466 parameters.

    ::

        3×32×32 -conv32- 32×32×32 -conv64- 64×32×32 -pool- 64×16×16
                -conv128- 128×16×16 -pool- 128×8×8 -fc- 128 -fc- 10

    The convolutions have no bias (BatchNorm follows them). Nine tenths of the
    parameters sit in the first fully connected layer (8192×128), which makes
    the gradient large (4.6 MB) relative to the compute: a model on which the
    cost of communication is visible.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(
            _conv_bn_relu(3, 32),
            _conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            _conv_bn_relu(64, 128),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 8 * 8, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )


def cifar_resnet(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision's ResNet ``name`` (``resnet18``, ``resnet50``) with the CIFAR stem: 3×3 stride-1
    first conv, no max-pool. torchvision is imported here, not with this module: its import costs
    about 2 s of CPU, which a run of the SimpleCNN need not pay (``trainer/data.py`` says more)."""
    import torchvision.models

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


#: name -> constructor taking no arguments, returning a model for 3×32×32 inputs and 10 classes
MODELS: dict[str, Callable[[], nn.Module]] = {
    "simplecnn": SimpleCNN,
    "resnet18": lambda: cifar_resnet("resnet18"),
    "resnet50": lambda: cifar_resnet("resnet50"),
}
if tuple(MODELS) != MODEL_NAMES:  # launch.py offers names.MODEL_NAMES without importing this module
    raise ImportError(
        f"trainer.models.MODELS {tuple(MODELS)} differs from trainer.names.MODEL_NAMES {MODEL_NAMES}"
    )


def build_model(name: str) -> nn.Module:
    """The model called ``name`` (see ``MODELS``), freshly initialised from torch's RNG."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (elements, not bytes)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":  # python -m trainer.models: print the table above
    for _name in MODELS:
        _model = build_model(_name)
        _out = _model(torch.zeros(2, 3, 32, 32))
        print(f"{_name:10s} {count_parameters(_model):>12,d} params  output {tuple(_out.shape)}")
