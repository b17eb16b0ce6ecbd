"""The compute device every torch stage resolves the same way (``device = auto``: CUDA when present)."""
from __future__ import annotations


def resolve_device(device: str = "auto"):
    import torch

    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
