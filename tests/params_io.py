"""Test-only: a trainer's model parameters as {canonical name: float32 NumPy array}, and back, for either
framework (the parity tests load the same weights into both trainers and the NumPy reference). The names
are the module paths without `.weight` ("blocks.0.attn.c_q"), as model.param_shapes gives them."""

from __future__ import annotations

import numpy as np


def _is_torch(model) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


def _torch_params(model) -> dict:
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    return {name.removesuffix(".weight"): p for name, p in model.named_parameters()}


def export_params(model) -> dict[str, np.ndarray]:
    if _is_torch(model):
        return {name: p.detach().float().cpu().numpy() for name, p in _torch_params(model).items()}
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return {k.removesuffix(".weight"): np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def load_params(model, params: dict) -> None:
    """Load {canonical name: array} into the model, keeping each parameter's dtype (and device)."""
    if _is_torch(model):
        import torch

        own = _torch_params(model)
        _check(set(own), {n: tuple(p.shape) for n, p in own.items()}, params)
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(torch.as_tensor(np.asarray(params[name])).to(device=p.device, dtype=p.dtype))
        return
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path

    current = dict(tree_flatten(model.parameters()))
    names = {k.removesuffix(".weight"): k for k in current}
    _check(set(names), {n: tuple(current[k].shape) for n, k in names.items()}, params)
    new = {names[n]: mx.array(np.asarray(v)).astype(current[names[n]].dtype) for n, v in params.items()}
    model.update(tree_map_with_path(lambda path, v: new.get(path, v), model.parameters()))
    mx.eval(model.parameters())


def _check(own: set, shapes: dict, params: dict) -> None:
    if own != set(params):
        raise KeyError(f"parameter names differ: {sorted(own ^ set(params))}")
    for name, shape in shapes.items():
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(f"{name}: shape {tuple(np.shape(params[name]))} != {shape}")
