"""Small models for CPU experiments; any ``torch.nn.Module`` works with the rest of mergeq."""
from .resnet import ARCHITECTURES, BasicBlock, ResNet, build_model, get_classifier, resnet8, resnet20

__all__ = ["ARCHITECTURES", "BasicBlock", "ResNet", "build_model", "get_classifier", "resnet8", "resnet20"]
