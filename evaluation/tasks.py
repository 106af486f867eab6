"""Downstream task scores through lm-evaluation-harness, on the model in memory.

Depth-pruning papers judge a pruned model by zero-shot accuracy as much as by
perplexity (SLEB, Song et al. 2024; BlockPruner, Zhong et al. 2024; Shortened
LLaMA, Kim et al. 2024), and lm-evaluation-harness (Gao et al., EleutherAI) is
the tool they use. The scorer wraps the model object the sweep has already
pruned in place (models.removal.removed_blocks) in the harness's HFLM: no copy,
no save and reload, so the scores belong to exactly the model whose perplexity
and speed the row reports, and checkpoints that from_pretrained cannot load
are scored too.

Every task is loaded once, by ``load_tasks``, before the first perplexity
pass: a Hub task that cannot be fetched (offline) or a misspelt name stops the
run before any work, with a line saying how to run a local task instead. The
loaded task objects are reused for every configuration, so the data are read
once.

lm_eval is imported here and only when --tasks is given: it takes seconds to
import, and the kit must answer --help and run without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from config import TaskSpec
from utils.errors import KitError

log = logging.getLogger("gpt2-pruning-kit")

# The metrics the kit records, where a task reports them: fractions of examples right, so that the report's
# percent and percentage-point columns mean what they say. acc and acc_norm are the log-likelihood
# (multiple-choice) tasks'; exact_match is the generative (generate_until) tasks'.
METRICS = ("acc", "acc_norm", "exact_match")
# lm-eval's results keys are "<metric>,<filter>"; a task without a filter_list has the one filter "none". A
# metric under another filter is recorded as "<metric>/<filter>" (gsm8k: exact_match/strict-match).
FILTER = "none"
LOCAL_HINT = ("to run offline or on private data, write an lm-eval task YAML over local files (dataset_path: json, "
              "dataset_kwargs: {data_files: {test: FILE.jsonl}}) in a folder and pass --include-path FOLDER")


@dataclass
class TaskScorer:
    """Scores one model on the run's tasks; called once per configuration (and on the healed model)."""

    spec: TaskSpec
    tokenizer: Any
    manager: Any  # lm_eval.tasks.TaskManager
    loaded: list  # the Task and Group objects, loaded once
    metrics: dict[str, tuple[str, ...]]  # reported name (task or group) -> the METRICS it has
    progress: bool = True  # lm-eval's progress bars (it offers no switch: without, its stderr is dropped)
    info: dict[str, dict] = field(default_factory=dict)  # per name: task version, shots, examples (sidecar)

    def __call__(self, model: nn.Module) -> dict[str, dict[str, float | int | None]]:
        """{name: {"n": examples, "acc": ..., "acc_stderr": ..., ...}} for ``model`` as it is now."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.spec.batch_size)
        was_training = model.training
        try:
            with _silenced(not self.progress), _as_local_rank_zero():
                out = lm_eval.simple_evaluate(lm, tasks=list(self.loaded), num_fewshot=self.spec.num_fewshot,
                                              limit=self.spec.limit, task_manager=self.manager, log_samples=False)
        finally:
            model.train(was_training)
        scores = {}
        for name, metrics in self.metrics.items():
            result = out["results"][name]
            samples = out.get("n-samples", {}).get(name, {})
            scores[name] = {"n": samples.get("effective", result.get("sample_len"))}
            for metric in metrics:
                base, _, filter_ = metric.partition("/")
                scores[name][metric] = _number(result.get(f"{base},{filter_ or FILTER}"))
                scores[name][f"{metric}_stderr"] = _number(result.get(f"{base}_stderr,{filter_ or FILTER}"))
            self.info[name] = {"version": out.get("versions", {}).get(name), "num_fewshot": out.get("n-shot", {})
                               .get(name), "examples": scores[name]["n"]}
        return scores


@contextlib.contextmanager
def _silenced(on: bool) -> Iterator[None]:
    """Drops stderr (lm-eval's progress bars) while ``on``."""
    if not on:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def _as_local_rank_zero() -> Iterator[None]:
    """LOCAL_RANK set to 0 while lm-eval evaluates.

    Under accelerate launch each process scores its own configurations on its
    own (an HFLM around a model object runs with world size 1), but
    simple_evaluate returns no scores wherever the LOCAL_RANK variable is not 0.
    """
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a standard error it could not compute (one example)
    return float(value) if isinstance(value, (int, float)) else None


def _manager(spec: TaskSpec):
    """A TaskManager: only the --include-path folder when it defines every task (indexing lm-eval's
    own thousands of task files takes seconds), else lm-eval's tasks and the folder."""
    from lm_eval.tasks import TaskManager

    if spec.include_path:
        local = TaskManager(include_path=spec.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in spec.names):
            return local
    return TaskManager(include_path=spec.include_path)


def _recorded(metric: str, filters) -> tuple[str, ...]:
    """The kit's names for ``metric`` under each of ``filters`` (none for a metric it does not record)."""
    if metric not in METRICS:
        return ()
    return tuple(metric if f == FILTER else f"{metric}/{f}" for f in (filters or [FILTER]))


def _reported(name: str, loaded: dict) -> dict[str, tuple[str, ...]]:
    """The names the results carry for one requested name, with their metrics: a task itself, a
    group's aggregate, or each task of a tag."""
    if name in loaded["groups"]:
        group = loaded["groups"][name]
        aggregated = tuple(dict.fromkeys(
            m for a in group.aggregate_metric_list or ()
            for m in _recorded(a.metric, [a.filter_list] if isinstance(a.filter_list, str) else a.filter_list)))
        if aggregated:
            return {name: aggregated}
    reported = {}
    for task_name, task in loaded["tasks"].items():
        filters = [f["name"] for f in task.config.filter_list or ()] or [FILTER]
        reported[task_name] = tuple(dict.fromkeys(n for m in task.config.metric_list or ()
                                                  for n in _recorded(m["metric"], filters)))
    return reported


def load_tasks(spec: TaskSpec, tokenizer, progress: bool = True, trust_code: bool = False) -> TaskScorer | None:
    """The run's tasks, loaded and checked before any measurement; None without --tasks.

    A task YAML can name Python to run (``!function module.fn``, a module beside it): in an --include-path
    folder that code runs only with ``trust_code`` (--trust-remote-code), as a model's own code does.
    """
    if not spec.names:
        return None
    if spec.include_path and not os.path.isdir(spec.include_path):
        raise KitError(f"--include-path '{spec.include_path}' is not a folder")
    if spec.include_path and not trust_code:
        refuse_task_code(spec.include_path)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-configuration set-up messages bury the kit's own
    manager = _manager(spec)
    loaded_objects, metrics = [], {}
    for name in spec.names:
        if name not in manager.all_tasks:
            where = f" or in --include-path '{spec.include_path}'" if spec.include_path else ""
            raise KitError(f"--tasks: no lm-eval task named '{name}'{where}; {LOCAL_HINT}")
        try:
            loaded = manager.load([name])
        except Exception as exc:  # the datasets library raises many kinds of errors for one missing file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KitError(f"--tasks: could not load the data of task '{name}' ({first[:200]}); Hub tasks need the "
                           f"network; {LOCAL_HINT}") from None
        reported = _reported(name, loaded)
        without = [n for n, m in reported.items() if not m]
        if without:
            raise KitError(f"--tasks: task '{without[0]}' reports none of {', '.join(METRICS)}; the kit records "
                           "those (multiple-choice tasks such as piqa and arc_easy, generative ones scored by "
                           "exact_match)")
        metrics.update(reported)
        loaded_objects += [loaded["groups"][name]] if name in loaded["groups"] else loaded["tasks"].values()
    log.info(f"Tasks: {', '.join(metrics)} ({_shots(spec)}, "
             f"{'all examples' if spec.limit is None else f'at most {spec.limit} examples each'}), "
             "scored for every configuration")
    return TaskScorer(spec, tokenizer, manager, loaded_objects, metrics, progress)


def refuse_task_code(folder: str) -> None:
    """Refuse a task folder whose YAML files run Python (``!function``) unless --trust-remote-code is given:
    lm-eval imports the named module from the folder when it loads the task."""
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if "!function" in text:
                raise KitError(f"--include-path: '{path}' runs Python from the folder (!function); pass "
                               "--trust-remote-code to allow it, or use a task without it")


def _shots(spec: TaskSpec) -> str:
    return "each task's default shots" if spec.num_fewshot is None else f"{spec.num_fewshot}-shot"
