"""Plain torch.nn out of a supernet, written and timed: extraction (``extract``), the
``dsnet export`` command and its TorchScript, ONNX and safetensors writers, and ``dsnet bench``.

May import ``dsnet.prune`` and below, never ``dsnet.report``. Importing one module of this package
imports none of its siblings.
"""
