"""``dsnet export --format safetensors``: a route's or the supernet's weights as safetensors.

- ``--subnet I``: the extracted static subnet's state dict (``dsnet.extract_subnet``; plain
  torch.nn names), loadable into that extracted module;
- ``--dynamic``: the whole supernet's state dict (the gated model runs on all of it), loadable
  into ``timm.create_model(model_name, **model_kwargs)`` after ``import dsnet``.

The file's metadata (strings, as safetensors stores them) names the model, its constructor
arguments and the route, so the weights can be matched to their architecture without dsnet's
checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from dsnet.errors import UserError

__all__ = ["export_safetensors"]


def export_safetensors(checkpoint: str, subnet: int | None, out: Path) -> str:
    """Write static subnet ``subnet``'s (None: the supernet's) weights of ``checkpoint`` to
    ``out`` (which must not exist); returns a summary line."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("--format safetensors needs the safetensors package: pip install safetensors") from None
    from dsnet.checkpoint import build_model, read_checkpoint
    from dsnet.export import extract_subnet

    state = read_checkpoint(checkpoint, ("supernet", "gate"))
    model = build_model(state).eval()
    if subnet is not None and not 0 <= subnet < model.num_subnets:
        raise UserError(f"--subnet {subnet} is out of range: {state['model_name']} has {model.num_subnets} "
                         f"static subnets (0..{model.num_subnets - 1})")
    module = extract_subnet(model, subnet) if subnet is not None else model
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    meta = {"format": "dsnet-weights", "model_name": state["model_name"], "stage": str(state.get("stage")),
            "model_kwargs": json.dumps(dict(state["model_kwargs"]), default=list),
            "subnet": "supernet" if subnet is None else str(subnet)}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    what = "supernet" if subnet is None else f"subnet {subnet}"
    return f"exported the {what} weights of {checkpoint} as safetensors -> {out} ({len(tensors)} tensors)"
