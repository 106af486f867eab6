"""A GGUF checkpoint as a source: which file it is, and how its weights are stored.

transformers loads a GGUF file (llama.cpp's format) into an ordinary model,
dequantizing every tensor to the requested dtype; the kit then prunes that
model like any other. What it keeps from the file is recorded here
(``GgufSource``), because the model card must say that the source was
quantized, and --save-gguf needs the file to copy kept tensors from byte for
byte (export.gguf).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from utils.errors import KitError

# Tensor types that store plain floating-point values; every other GGML type is a quantized format.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file a model was loaded from: where it is and its weights' storage types."""

    folder: str  # what from_pretrained is given (a local folder, or a Hub repo id)
    file: str  # the file's name within ``folder``
    path: str | None  # the local file, None until a Hub file is downloaded
    tensor_types: tuple[str, ...] = ()  # GGML types of its tensors, e.g. ("F32", "Q4_1", "Q6_K")
    file_type: str | None = None  # its general.file_type, e.g. "MOSTLY_Q4_1"

    @property
    def quantized_types(self) -> tuple[str, ...]:
        return tuple(t for t in self.tensor_types if t not in FLOAT_TYPES)

    def describe(self, dtype: str) -> str:
        """'the source was quantized (Q4_1, Q6_K), dequantized to float32' or the float-only equivalent."""
        if self.quantized_types:
            return f"the source was quantized ({', '.join(self.quantized_types)}), dequantized to {dtype}"
        return f"the source stored {', '.join(self.tensor_types)} weights, loaded as {dtype}"

    def as_dict(self) -> dict:
        return {"file": self.file, "tensor_types": list(self.tensor_types), "file_type": self.file_type,
                "quantized_types": list(self.quantized_types)}


def gguf_source(name: str, gguf_file: str | None, local: bool) -> GgufSource | None:
    """The GGUF that ``--model name`` (with ``--gguf-file``) names, or None for an ordinary checkpoint.

    A GGUF source is a .gguf file, a folder holding exactly one .gguf file and
    no config.json, or a folder or Hub repo id with --gguf-file NAME.
    """
    path = os.path.expanduser(name)
    if gguf_file is not None:
        if path.endswith(".gguf"):
            raise KitError(f"--model '{name}' is a GGUF file already; --gguf-file names a file inside a folder or "
                           "Hub repo")
        if not local:
            return GgufSource(name, gguf_file, None)
        file = os.path.join(path, gguf_file)
        if not os.path.isfile(file):
            raise KitError(f"--gguf-file '{gguf_file}' is not a file in '{name}'")
        return GgufSource(path, gguf_file, file)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise KitError(f"GGUF file '{name}' does not exist")
        return GgufSource(os.path.dirname(os.path.abspath(path)), os.path.basename(path), path)
    if not (local and os.path.isdir(path)) or os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise KitError(f"'{name}' holds {len(found)} GGUF files ({', '.join(found)}); name one with --gguf-file")
    return GgufSource(path, found[0], os.path.join(path, found[0])) if found else None


def with_storage(source: GgufSource, path: str) -> GgufSource:
    """``source`` with the local ``path`` and the tensor and file types read from its header."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise KitError(f"cannot read GGUF file '{path}': {exc}") from None
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    field = reader.get_field("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.contents())
        file_type = LlamaFileType(value).name if value in LlamaFileType._value2member_map_ else str(value)
    return GgufSource(source.folder, source.file, path, types, file_type)


def source_of(model) -> GgufSource | None:
    """The GgufSource a model was loaded from (models.loading records it), None for other checkpoints."""
    return getattr(model, "gguf_source", None)
