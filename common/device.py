"""Check a ``device`` setting before any work starts, so a bad one is a one-line error naming the field."""

from __future__ import annotations


def check_device(name: str, field: str = "device") -> str:
    """``name`` if torch can use it here ("cpu", "cuda", "cuda:1", "mps", ...); else ValueError naming ``field``."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{field}: '{name}' is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"{field}: '{name}' asked for, but this torch build has no CUDA support (a CPU-only build); "
                             "use cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"{field}: '{name}' asked for, but no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, driver?)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}: '{name}' asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}: '{name}' asked for, but MPS is not available here")
    return name
