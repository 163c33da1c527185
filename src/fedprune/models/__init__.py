"""fedprune.models: the model zoo and the registry that builds models by name.

Use :func:`build_model` with a registry name (see :data:`MODELS` or :func:`list_models`),
the data set's input shape ``(C, H, W)`` and its class count.
"""

from fedprune.models.registry import (
    MODELS,
    ModelInfo,
    build_model,
    describe,
    keras_param_count,
    list_models,
)
from fedprune.models.zoo import (
    CNN6,
    FC2,
    FEMNISTCNN,
    VGG,
    CelebACNN,
    GapCNN,
    InceptionNet,
    LeafCNN,
    ModelDoesNotFitError,
    NaiveInception,
    ResNet7,
    ResNet7Block,
    ResNet20,
    ResNetBasicBlock,
    SamePad2d,
    TwoCNN,
)

__all__ = [
    "CNN6",
    "FC2",
    "FEMNISTCNN",
    "MODELS",
    "VGG",
    "CelebACNN",
    "GapCNN",
    "InceptionNet",
    "LeafCNN",
    "ModelDoesNotFitError",
    "ModelInfo",
    "NaiveInception",
    "ResNet7",
    "ResNet7Block",
    "ResNet20",
    "ResNetBasicBlock",
    "SamePad2d",
    "TwoCNN",
    "build_model",
    "describe",
    "keras_param_count",
    "list_models",
]
