"""A run's settings as frozen data.

main.py turns the command line into one RunConfig, once; everything below it
takes the part it needs (a WindowSpec, a HealSpec, ...) and never sees
argparse. Being plain data, a config is written into the results file's JSON
sidecar as it is (``to_dict``), so a resumed or merged file can be compared
with the run that continues it field by field.

This module imports nothing heavy: `python main.py --help` builds its parser
from here and from the mode registry without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from utils.errors import KitError

DEFAULT_PROMPT = "The future of artificial intelligence is"
# Learning rates that suit a short heal: adapters tolerate a larger step than full weights.
DEFAULT_HEAL_LR = {"lora": 2e-4, "full": 2e-5}
DEFAULT_HEAL_SEQ_LEN = 256
DEFAULT_STRIDE = 512
# --patch: training-free compensation of removed blocks (pruning.compensation.METHODS, and none).
PATCHES = ("none", "lstsq", "cosine", "magnitude")


@dataclass(frozen=True)
class Shard:
    """Job ``index`` (0-based) of ``count`` independent jobs of one sweep."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """'I/N' with 0 <= I < N (Slurm: --shard $SLURM_ARRAY_TASK_ID/N with --array=0-(N-1))."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise KitError(f"expected I/N such as 0/4 (job I of N, counting from 0), got '{text}'") from None
    if count < 1:
        raise KitError(f"'{text}' has N = {count}; N must be at least 1")
    if not 0 <= index < count:
        raise KitError(f"'{text}' has I = {index}; I counts from 0, so valid values are 0..{count - 1}")
    return Shard(index, count)


@dataclass(frozen=True)
class DataSpec:
    """Which model is pruned and which text it is judged on."""

    model: str = "distilgpt2"
    dataset: str = "wikitext-2-raw-v1"
    split: str = "test"
    text_column: str = "text"
    max_tokens: int | None = None
    cache_dir: str | None = None
    no_cache: bool = False
    trust_remote_code: bool = False  # run code shipped with the model (auto_map); never by default
    gguf_file: str | None = None  # --gguf-file: the .gguf inside a --model folder or Hub repo
    device_map: str | None = None  # --device-map: accelerate places the model over devices (None: --device)
    max_memory: str | None = None  # --max-memory "0=20GiB,cpu=60GiB"
    offload_dir: str | None = None  # --offload-dir: where --device-map puts weights mapped to disk


@dataclass(frozen=True)
class WindowSpec:
    """Perplexity windows: a convention of evaluation.windows, with or without BOS before every window.

    max_length and stride are None until resolved against the model's context
    (stride stays None for conventions that take no stride); prefix_token, the
    token id fed before windows (BOS, or lm-eval's prefix token), is filled in
    from the tokenizer when the model is loaded.
    """

    max_length: int | None = None
    stride: int | None = None
    batch_size: int = 1
    protocol: str = "sliding"
    bos: bool = False
    prefix_token: int | None = None
    kl: bool = False  # KL divergence and top-1 agreement against the baseline in results passes (--kl)

    @property
    def label(self) -> str:
        """The results file's ``protocol`` cell: the convention, and ``+bos`` when every window starts with BOS."""
        return f"{self.protocol}+bos" if self.bos else self.protocol

    def resolved(self, context: int, strided: bool = True) -> "WindowSpec":
        """The spec with the model's defaults filled in, checked against its context size.

        ``strided`` False (a convention that takes no stride) leaves stride None.
        """
        max_length = self.max_length or context
        if max_length > context:
            raise KitError(f"--max-length {max_length} exceeds the model's context size of {context} tokens")
        text_tokens = max_length - self.bos  # BOS takes one position of every window
        if text_tokens < 2:
            raise KitError(f"--max-length {max_length} leaves no token to score: a window needs at least 2 tokens"
                           + (" besides BOS" if self.bos else ""))
        if not strided:
            return replace(self, max_length=max_length, stride=None)
        stride = self.stride or max(1, min(DEFAULT_STRIDE, text_tokens // 2))
        if stride > text_tokens:
            raise KitError(f"--stride {stride} is larger than --max-length {max_length}"
                           + (" less the BOS position" if self.bos else ""))
        return replace(self, max_length=max_length, stride=stride)


@dataclass(frozen=True)
class SelectSpec:
    """How the modes pick the units (blocks, attentions, MLPs; models.units) to remove."""

    remove: tuple[int | str, ...] | None = None  # --remove: block indices and sublayer names ("attn4")
    min_remove: int = 2
    max_remove: int | None = None
    ratio: float = 0.5
    num_remove: int | None = None
    rule: str = "bi"  # --metric: the scoring rule of --mode importance (pruning.rules)
    beam_width: int = 4
    calib_tokens: int = 16384
    max_configs: int = 5000
    unit: str = "block"  # --unit: the candidates, block | attn | mlp | sublayer (models.units.UNIT_KINDS)
    target_params: str | None = None  # --target-params: "0.8" (a fraction of the original) or "60M"
    target_speedup: float | None = None  # --target-speedup: measured prefill speed-up over the baseline
    patch: str = "none"  # --patch: a map fitted per removed run of blocks and merged into the weights (PATCHES)
    generations: int = 30  # --generations: evolve's generations at each k
    offspring: int = 16  # --offspring: evolve's offspring per generation
    choose_patched: bool = False  # --choose-patched: candidates are scored with their own --patch fitted
    race: bool = False  # --race: greedy and beam rank each step's candidates in a race (pruning.race)
    calib_slices: int = 1  # --calib-slices: also choose on N disjoint slices and report how the picks hold
    seed: int = 42  # --seed, for evolve's draws


@dataclass(frozen=True)
class SpeedSpec:
    """The latency measurement; ``enabled`` False is --no-speed."""

    enabled: bool = True
    runs: int = 10
    warmup: int = 2
    gen_tokens: int = 64
    prompt: str = DEFAULT_PROMPT


@dataclass(frozen=True)
class HealSpec:
    """Fine-tuning the pruned model; steps 0 means no healing."""

    steps: int = 0
    mode: str = "lora"
    lr: float | None = None
    batch_size: int = 4
    seq_len: int | None = None  # None: DEFAULT_HEAL_SEQ_LEN or the context size
    lora_rank: int = 8
    kd: bool = False
    train_dataset: str | None = None
    seed: int = 42

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_HEAL_LR[self.mode]

    def resolved(self, context: int) -> "HealSpec":
        seq_len = self.seq_len or min(DEFAULT_HEAL_SEQ_LEN, context)
        if seq_len > context:
            raise KitError(f"--heal-seq-len {seq_len} exceeds the model's context size of {context} tokens")
        if self.lr is not None and not self.lr > 0:
            raise KitError(f"--heal-lr must be positive, got {self.lr}")
        return replace(self, seq_len=seq_len)


@dataclass(frozen=True)
class OutputSpec:
    """What a run writes, and the files the CSV-reading modes read."""

    save_results: bool = False
    output_dir: str = "results"
    resume: str | None = None
    save_model: str | None = None
    plot: bool = False
    quiet: bool = False
    input: str | None = None
    inputs: tuple[str, ...] = ()
    shard: Shard | None = None
    allow_partial: bool = False  # merge: accept missing shards
    save_gguf: str | None = None  # --save-gguf: the pruned GGUF file (whole blocks of a GGUF source)

    @property
    def writes_csv(self) -> bool:
        # --plot draws from the CSV, so it writes one too
        return self.save_results or self.plot or self.resume is not None


@dataclass(frozen=True)
class TaskSpec:
    """Downstream tasks scored with lm-evaluation-harness on every configuration; no names: none."""

    names: tuple[str, ...] = ()
    num_fewshot: int | None = None  # None: each task's own default (0 for most)
    limit: int | None = None  # examples per task (None: all)
    batch_size: int = 1
    include_path: str | None = None  # a folder of lm-eval task YAML files (local data)


@dataclass(frozen=True)
class RunConfig:
    mode: str
    data: DataSpec = field(default_factory=DataSpec)
    windows: WindowSpec = field(default_factory=WindowSpec)
    select: SelectSpec = field(default_factory=SelectSpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    heal: HealSpec = field(default_factory=HealSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    tasks: TaskSpec = field(default_factory=TaskSpec)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 42
    command_line: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (a shard as 'I/N')."""
        data = asdict(self)
        data["output"]["shard"] = str(self.output.shard) if self.output.shard else None
        return data

