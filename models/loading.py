"""Loading a causal LM and its tokenizer, from the Hub or a local directory."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.errors import OFFLINE_HINT, KitError, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KitError("--device cuda was requested but no CUDA device is available (choices: auto, cpu, cuda, mps)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise KitError("--device mps was requested but MPS is not available (choices: auto, cpu, cuda, mps)")
    return torch.device(name)


def looks_local(name: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else is meant as a path."""
    return (os.path.exists(name) or name.startswith((".", "/", "~", "\\")) or name.count("/") > 1
            or name.endswith(("/", "\\")) or "\\" in name)


def load_model(name: str, device: torch.device, dtype: str = "auto") -> tuple[Any, Any]:
    """Model (eval mode, on ``device``) and tokenizer.

    dtype 'auto' means float32 on CPU (half precision is slow and inaccurate
    there) and the checkpoint's own dtype elsewhere. trust_remote_code is never
    set: the kit only runs architectures that ship with transformers.
    """
    if looks_local(name) and not os.path.isdir(os.path.expanduser(name)):
        raise KitError(f"model directory '{name}' does not exist")
    torch_dtype: Any = DTYPES[dtype] if dtype != "auto" else (torch.float32 if device.type == "cpu" else "auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        where = "" if looks_local(name) else f"; {OFFLINE_HINT}"
        raise KitError(f"cannot load model '{name}': {first_line(exc)}{where}") from None
    model.to(device).eval()
    return model, tokenizer


def dtype_name(model: Any) -> str:
    return str(model.dtype).removeprefix("torch.")
