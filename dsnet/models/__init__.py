"""dsnet's supernets; importing this package registers them with timm."""
from dsnet.models.mobilenet_v1 import ds_mobilenet_v1
from dsnet.models.net import DenseNet, DSNet, DynamicOutput
from dsnet.models.resnet import ds_resnet20, ds_resnet50, ds_resnet56
from dsnet.models.spec import MODELS, StageSpec

__all__ = ["DSNet", "DenseNet", "DynamicOutput", "StageSpec", "MODELS", "ds_mobilenet_v1",
           "ds_resnet20", "ds_resnet56", "ds_resnet50"]
