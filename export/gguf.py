"""--save-gguf: the pruned model as a GGUF file, its kept tensors copied byte for byte.

Removing whole blocks from a GGUF source needs no requantization: every
tensor of a kept block and every other tensor (embeddings, final norm, output)
is copied as stored, quantized or not, with the kept blocks renumbered
(``blk.N.`` tensor names), ``<arch>.block_count`` set to the kept depth and
every per-block metadata array (an ``<arch>.`` array with one entry per
block, such as per-layer head counts in some architectures) cut to the kept
blocks; the tokenizer and all other metadata are copied unchanged. The file is
written beside the target under a temporary name, reloaded through
transformers' GGUF loader and compared with the kit's pruned model in memory
(bit-equal logits), and only then renamed to the target.

A patched model (``--patch``) changes a few tensors: each of those is written
as F32 holding the kit's patched values exactly (a quantized type would round
them; GGUF allows a type per tensor, so the rest stay as stored), found by
gguf's own map from transformers' parameter names to GGUF tensor names. A map
that untied the token embeddings from the LM head (a run from block 0) is
refused: the file would need an output tensor the source does not have.

Removed sublayers cannot be written this way (GGUF has no zero-output
sublayer, and zeroing a quantized projection means requantizing), nor can a
healed model (its weights are no longer the file's).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Sequence

import torch
from torch import nn

from config import RunConfig
from models.compensation import Patch, applied
from models.families import num_blocks
from models.gguf_source import gguf_source, source_of
from models.loading import gguf_kwargs, looks_local
from models.placement import input_device
from models.removal import removed_blocks
from models.units import is_whole_blocks, kept_blocks
from utils.errors import KitError, WriteError

log = logging.getLogger("gpt2-pruning-kit")

BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def check_gguf_output(config: RunConfig) -> None:
    """Refuse --save-gguf before any work where it cannot be honoured (runner.evaluate checks the mode)."""
    target, data = config.output.save_gguf, config.data
    if target is None:
        return
    if gguf_source(data.model, data.gguf_file, looks_local(data.model)) is None:
        raise KitError(f"--save-gguf copies tensors from a GGUF source, and '{data.model}' is not a GGUF file "
                       "(--save-model writes a safetensors checkpoint)")
    if config.heal.steps:
        raise KitError("--save-gguf copies the source's tensors unchanged, and healing changes them; "
                       "use --save-model for a healed model")
    if config.select.unit != "block" or not is_whole_blocks(config.select.remove or ()):
        raise KitError("--save-gguf removes whole blocks only; a removed attention or MLP would need its quantized "
                       "weights rewritten (use --save-model, which zeroes the sublayer)")
    if os.path.exists(target):
        raise KitError(f"--save-gguf file '{target}' exists; choose a new name")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise KitError(f"--save-gguf cannot write into '{parent}'")


def _value(field, types) -> tuple:
    """A metadata field's value as GGUFWriter.add_key_value takes it: (value, type, sub_type)."""
    from gguf import GGUFValueType

    kind = types[0]
    if kind == GGUFValueType.ARRAY:
        if len(types) != 2:
            raise KitError(f"GGUF metadata '{field.name}' is an empty or nested array, which the gguf writer "
                           "cannot copy")
        sub = types[1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], kind, sub
        return field.contents(), kind, sub
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]), kind, None
    return field.contents(), kind, None


def patched_tensors(model: nn.Module, patch: Patch | None, arch: str, n_blocks: int) -> dict[str, "np.ndarray"]:
    """The GGUF name and float32 values of every tensor the patch changes (original block numbering)."""
    if patch is None or not patch.replacements:
        return {}
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    if patch.untied:
        raise KitError("--save-gguf cannot write this patch: its map for the run from block 0 unties the token "
                       "embeddings from the LM head, and the GGUF source has no separate output tensor; use "
                       "--save-model, or keep block 0")
    archs = {name: enum for enum, name in MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise KitError(f"--save-gguf cannot name the patched tensors of a '{arch}' GGUF file; use --save-model")
    names = get_tensor_name_map(archs[arch], n_blocks)
    paths = {id(module): path for path, module in model.named_modules()}
    out = {}
    for r in patch.replacements:
        hf_name = f"{paths[id(r.module)]}.{r.name}"
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KitError(f"--save-gguf cannot find the GGUF tensor of '{hf_name}', which the patch changes; "
                           "use --save-model")
        out[name] = r.tensor().detach().float().cpu().numpy()
    return out


def write_pruned_gguf(source: str, removed: Sequence[int], target: str,
                      changed: dict | None = None) -> None:
    """Write ``source`` less the blocks ``removed`` to ``target``, the tensors named in ``changed`` (original
    numbering) written as F32 with those values (see the module docstring)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    if reader.byte_order != "I":
        raise KitError(f"'{source}' is a big-endian GGUF file; --save-gguf writes little-endian files only")
    arch = reader.get_field("general.architecture").contents()
    count_key = f"{arch}.block_count"
    n_blocks = int(reader.get_field(count_key).contents())
    keep = kept_blocks(n_blocks, removed)
    renumber = {old: new for new, old in enumerate(keep)}
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it opens
    writer = GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, kind, sub = _value(field, field.types)
        if name == count_key:
            value = len(keep)
        elif name.startswith(f"{arch}.") and kind == GGUFValueType.ARRAY and len(value) == n_blocks:
            value = [value[i] for i in keep]
        elif name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(name, value, kind, sub_type=sub)
    changed = dict(changed or {})
    for tensor in reader.tensors:
        match = BLOCK_TENSOR.fullmatch(tensor.name)
        name = tensor.name
        if match:
            index = int(match.group(1))
            if index not in renumber:
                continue
            name = f"blk.{renumber[index]}.{match.group(2)}"
        if tensor.name in changed:
            writer.add_tensor(name, changed.pop(tensor.name), raw_dtype=GGMLQuantizationType.F32)
        else:
            writer.add_tensor(name, tensor.data, raw_dtype=tensor.tensor_type)
    if changed:
        raise KitError(f"--save-gguf: the patch changes {', '.join(sorted(changed))}, which '{source}' does not "
                       "hold; use --save-model")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


@torch.no_grad()
def reloads_equal(path: str, pruned: nn.Module, sample_ids: torch.Tensor) -> float:
    """Max logit difference between ``pruned`` and the GGUF at ``path`` reloaded by transformers."""
    from transformers import AutoModelForCausalLM

    path = os.path.abspath(path)
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=pruned.dtype,
                                                    **gguf_kwargs(path)).eval()
    reloaded.to(input_device(pruned))
    inputs = sample_ids.view(1, -1).to(input_device(pruned))
    return (reloaded(input_ids=inputs).logits.to(inputs.device) - pruned(input_ids=inputs).logits).abs().max().item()


def export_gguf(model: nn.Module, removed: Sequence[int], target: str, sample_ids: torch.Tensor,
                patch: Patch | None = None) -> None:
    """Write the pruned (and patched) GGUF atomically and check that it reloads to the model the kit measured."""
    from gguf import GGUFReader

    source = source_of(model)
    reader = GGUFReader(source.path)
    arch = reader.get_field("general.architecture").contents()
    changed = patched_tensors(model, patch, arch, int(reader.get_field(f"{arch}.block_count").contents()))
    del reader
    parent = os.path.dirname(os.path.abspath(target))
    fd, staging = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.partial-", suffix=".gguf", dir=parent)
    os.close(fd)
    try:
        write_pruned_gguf(source.path, removed, staging, changed)
        with removed_blocks(model, removed) as pruned, applied(pruned, patch):
            diff = reloads_equal(staging, pruned, sample_ids)
        if diff != 0.0:
            raise WriteError(f"the GGUF written for '{target}' reloads to a different model (max logit difference "
                             f"{diff:.3g}); nothing was saved")
        log.info("Checked: the GGUF reloads through transformers' GGUF loader to identical logits")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp made it private
        os.replace(staging, target)
    except OSError as exc:
        raise WriteError(f"cannot write the pruned GGUF to '{target}': {exc.strerror or exc}; nothing was saved "
                         "there (the results files are intact)") from None
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    kept = len(kept_blocks(num_blocks(model), removed))
    patched = (f"; {len(changed)} tensors the --patch {patch.method} changed written as F32 "
               f"({sum(v.nbytes for v in changed.values()) / 1e6:.1f} MB)") if changed else ""
    log.warning(f"Pruned GGUF written to {target} ({kept} blocks; other tensors copied unchanged: "
                f"{', '.join(source.tensor_types)}{patched})")
