"""Loading a causal LM and its tokenizer, from the Hub, a local directory or a GGUF file.

A GGUF source (models.gguf_source) is dequantized to --dtype on loading and is
an ordinary in-memory model from then on; the model carries its GgufSource
(``model.gguf_source``) and, with --device-map, its Placement
(``model.kit_placement``), for the export that needs them.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from models.gguf_source import GgufSource, gguf_source, with_storage
from models.placement import Placement
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


def load_model(name: str, device: torch.device, dtype: str = "auto", trust_remote_code: bool = False,
               gguf_file: str | None = None, placement: Placement = Placement()) -> tuple[Any, Any]:
    """Model (eval mode, on ``device`` or spread by ``placement``) and tokenizer.

    dtype 'auto' means float32 on CPU (half precision is slow and inaccurate
    there) and the checkpoint's own dtype elsewhere. A model's own code (a
    config with ``auto_map``) never runs unless ``trust_remote_code`` is set
    (--trust-remote-code): transformers would otherwise ask on stdin, which
    hangs a batch job, and answering yes runs code from the model directory.
    """
    path = os.path.expanduser(name)
    local = looks_local(name)
    source = gguf_source(name, gguf_file, local)
    if local and source is None and not os.path.isdir(path):
        raise KitError(f"model directory '{name}' does not exist")
    folder = source.folder if source else path
    if source and placement.device_map and placement.offload_dir:
        raise KitError("transformers cannot offload a GGUF model to disk; drop --offload-dir (GPU and CPU "
                       "placement with --device-map and --max-memory work)")
    if local and not trust_remote_code:
        refuse_own_code(folder)
    torch_dtype: Any = DTYPES[dtype] if dtype != "auto" else (torch.float32 if device.type == "cpu" else "auto")
    where = "" if local else f"; {OFFLINE_HINT}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                  **({"gguf_file": source.file} if source else {}))
    except Exception as exc:  # missing files, a broken tokenizer.json, a download that failed
        raise KitError(f"cannot load the tokenizer of '{name}': {first_line(exc)}{where}") from None
    # transformers builds an empty tokenizer for a directory without tokenizer files: it tokenizes to nothing
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not tokenizer("The river", verbose=False)["input_ids"]:
        raise KitError(f"'{name}' has no usable tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                       "save the tokenizer beside the model with tokenizer.save_pretrained")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            **gguf_kwargs(source.file if source else None), **placement.load_kwargs())
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False, which would run the code
        raise KitError(f"cannot load model '{name}': its pickled weights hold more than tensors "
                       f"({pickled_object(exc)}), and unpickling them could run code; the kit loads only plain "
                       "tensors (convert a copy you trust to safetensors)") from None
    except Exception as exc:  # truncated weights (SafetensorError), unknown architectures, failed downloads
        raise KitError(f"cannot load model '{name}': {first_line(exc)}{where}") from None
    check_loading_info(name, info)
    check_finite_weights(name, model)
    if placement.device_map is None:
        model.to(device)
    model.eval()
    if source:
        model.gguf_source = with_storage(source, source.path or cached_gguf(source))
    if placement.device_map:
        model.kit_placement = placement
    return model, tokenizer


def pickled_object(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, from its message ('unsupported GLOBAL posix.system')."""
    line = next((x.strip() for x in str(exc).splitlines() if "GLOBAL" in x), "")
    words = line.split()
    return f"{words[words.index('GLOBAL') + 1]}" if "GLOBAL" in words[:-1] else "an object torch refuses"


def check_loading_info(name: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not match its config: transformers would fill missing weights
    (a config.json with more blocks than the weights hold) with random values, and drop unexpected ones."""
    for kind, meaning in (("missing_keys", "the config asks for weights the checkpoint lacks (they would be "
                           "random)"), ("unexpected_keys", "the checkpoint holds weights the config has no place for"),
                          ("mismatched_keys", "weights have other shapes than the config gives")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise KitError(f"model '{name}' does not match its config.json: {meaning}: {keys[0]}{more}")


def check_finite_weights(name: str, model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or infinity: every perplexity would be nan and every comparison void.
    Weights offloaded to disk (meta tensors here) are not read."""
    for param_name, param in model.named_parameters():
        if param.device.type != "meta" and not torch.isfinite(param).all():
            raise KitError(f"model '{name}' has NaN or infinite values in its weight {param_name}; a damaged or "
                           "diverged checkpoint cannot be measured")


def check_token_ids(model: torch.nn.Module, ids: torch.Tensor, what: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer larger than the model's vocabulary), which
    would fail mid-run with an IndexError or, on a GPU, a device-side assert."""
    size = model.get_input_embeddings().num_embeddings
    top = int(ids.max()) if ids.numel() else -1
    if top >= size:
        raise KitError(f"the tokenizer gives token id {top} in {what}, but the model has embeddings for ids "
                       f"0..{size - 1} only: the tokenizer belongs to another model, or tokens were added without "
                       "resizing the embeddings")


def gguf_kwargs(file: str | None) -> dict:
    """from_pretrained's keywords for a GGUF ``file`` (a name in the folder, or a path): every tensor
    dequantized into a plain dense model.

    With dequantize=True the GGUF quantizer leaves no quantization state on
    the model (no hf_quantizer, no quantization_config), so save_pretrained
    writes an ordinary checkpoint; without it the quantizer stays attached,
    even where every weight came out dense, and save_pretrained refuses.
    """
    if file is None:
        return {}
    from transformers.utils.quantization_config import GgufConfig

    return {"gguf_file": file, "quantization_config": GgufConfig(dequantize=True)}


def cached_gguf(source: GgufSource) -> str:
    """The local copy of a Hub GGUF file that from_pretrained downloaded."""
    from transformers.utils import cached_file

    return cached_file(source.folder, source.file)


def refuse_own_code(path: str) -> None:
    """A local model whose config maps its classes to code in the directory (auto_map) is refused."""
    for file in ("config.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(path, file), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            raise KitError(f"'{path}' asks to run its own code ({file} has auto_map); the kit runs only the "
                           "architectures that ship with transformers unless you pass --trust-remote-code")


def dtype_name(model: Any) -> str:
    return str(model.dtype).removeprefix("torch.")
