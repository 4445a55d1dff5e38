"""dsnet: Dynamic Slimmable Networks (DS-Net) for PyTorch and timm.

``import dsnet`` registers the supernets with timm::

    model = timm.create_model("ds_mobilenet_v1", num_classes=1000)
    model(x, subnet=3)            # static subnet 3 on dense slices
    model(x, subnet="dynamic")    # each sample takes the route its gate picks
    model = dsnet.load_checkpoint("runs/quickstart/gate/checkpoints/last.pth")  # eval mode
"""
from dsnet.deploy.extract import extract_subnet
from dsnet.models import MODELS, DenseNet, DSNet
from dsnet.models.madds import count_madds, count_params
from dsnet.train.checkpoint import load_checkpoint

__version__ = "0.1.0"
__all__ = ["DSNet", "DenseNet", "MODELS", "count_madds", "count_params", "extract_subnet", "load_checkpoint", "__version__"]
