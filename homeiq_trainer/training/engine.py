"""One LoRA fine-tuning run: examples in, adapter and losses out.

Heavy imports (torch, transformers, peft) live inside the functions, so importing this module costs
nothing; the daemon never imports it at all (training runs in a child process).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import logging
import os
import resource
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from homeiq_trainer.messages import Phase, ProgressEvent, first_line
from homeiq_trainer.training.evaluate import split_examples

if TYPE_CHECKING:
    import torch

    from homeiq_trainer.training.data import Example

_LOGGER = logging.getLogger(__name__)

# peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, so every
# run and every `generate` printed that FutureWarning (peft 0.21, transformers 5): a note for peft's
# authors, not for our users. Only that one is silenced.
warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers"
)

LABEL_PAD = -100
# Tokenization reports progress after each this many examples, so a huge set never looks hung.
TOKENIZE_CHUNK_EXAMPLES = 1024
# A tokenizer that reads more than this share of the first examples' tokens as <unk> is refused.
UNK_CHECK_EXAMPLES = 200
MAX_UNK_SHARE = 0.25  # an empty T5 tokenizer reads each word as "▁" + <unk>: 50%
# CPU flags (from /proc/cpuinfo) that claim fast bf16 matrix multiplies; `bf16_matmul_speedup` checks the claim.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# `precision: auto` takes bf16 autocast on a CPU only where bf16 matrix multiplies beat fp32 by this
# much: autocast's casts and the elementwise work it does not speed up eat the rest (a 3.9× matmul
# gain gave 1.5-1.6× per epoch).
BF16_MIN_MATMUL_SPEEDUP = 1.5
# ... and only where this process may use at least this much memory (the machine's, or its container's
# limit): a CPU bf16 run peaks about 0.3 GB above fp32 (2,000 examples at defaults on a Zen 5 EPYC:
# 1,152-1,164 MiB against 896), which a 4 GB box running Home Assistant beside it should not pay for speed.
# 6 GiB: a 4 GB machine (about 3.8 GiB as the kernel counts it) keeps fp32, an 8 GB one takes bf16.
BF16_MIN_MEMORY_BYTES = 6 * 2**30
# The probe: (tokens, d_model) @ (d_model, d_ff), as in a training step, PROBE_INNER times, best of PROBE_REPEATS.
PROBE_SHAPE = (512, 512, 1024)
PROBE_INNER = 4
PROBE_REPEATS = 3


SumAcrossWorkers = Callable[[list[float]], list[float]]
"""Element-wise sum of a list of figures over all workers of a distributed run (the same list when alone)."""


def _alone(values: list[float]) -> list[float]:
    return values


class TrainingObserver(Protocol):
    """Receives what a run does; knows nothing about where it goes (terminal, pipe, MQTT)."""

    def phase(self, phase: Phase, message: str = "") -> None: ...

    def progress(self, event: ProgressEvent) -> None: ...


class NullObserver:
    """Ignores everything."""

    def phase(self, phase: Phase, message: str = "") -> None:
        pass

    def progress(self, event: ProgressEvent) -> None:
        pass


@dataclass(frozen=True)
class Hyperparameters:
    """Everything that shapes one run's training."""

    base_model: str
    epochs: int
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    source_max_tokens: int
    target_max_tokens: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...]
    seed: int
    device: str = "auto"
    threads: int = 0
    eval_fraction: float = 0.1
    min_eval_examples: int = 20
    group_by_length: bool = True
    batch_tokens: int = 512
    precision: str = "auto"
    early_stopping_patience: int = 2
    eval_every_steps: int = 0


@dataclass
class TrainOutcome:
    """What training produced."""

    cancelled: bool
    train_examples: int
    eval_examples: int
    final_loss: float | None
    eval_loss: float | None
    loss_history: list[dict[str, float]]
    train_runtime_s: float
    train_samples_per_second: float
    padding_efficiency: float | None
    device: str
    steps: int
    precision: str = "fp32"
    train_cpu_s: float = 0.0  # CPU seconds of all threads while training (robust to other processes' load)
    peak_rss_mb: float | None = None
    eval_history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False


@dataclass
class _LossMeter:
    """Exact per-token loss sums, so reported losses never depend on how the Trainer scales its own."""

    window_sum: float = 0.0
    window_tokens: int = 0
    epoch_sum: float = 0.0
    epoch_tokens: int = 0
    last_epoch_mean: float | None = None
    real_tokens: int = 0
    padded_tokens: int = 0
    examples_seen: int = 0
    # Under Ray every worker meters its own batches; sums (never means) are added up over workers.
    reduce: SumAcrossWorkers = _alone
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, loss_sum: float, tokens: int) -> None:
        with self.lock:
            self.window_sum += loss_sum
            self.window_tokens += tokens
            self.epoch_sum += loss_sum
            self.epoch_tokens += tokens

    def take_window(self) -> float | None:
        with self.lock:
            total, tokens = self.reduce([self.window_sum, float(self.window_tokens)])
            self.window_sum, self.window_tokens = 0.0, 0
            return total / tokens if tokens else None

    def close_epoch(self) -> None:
        with self.lock:
            total, tokens = self.reduce([self.epoch_sum, float(self.epoch_tokens)])
            if tokens:
                self.last_epoch_mean = total / tokens
            self.epoch_sum, self.epoch_tokens = 0.0, 0

    def totals(self) -> tuple[int, int, int]:
        """(real tokens, padded tokens, examples) over all workers."""
        counts = [float(self.real_tokens), float(self.padded_tokens), float(self.examples_seen)]
        real, padded, seen = self.reduce(counts)
        return int(real), int(padded), int(seen)


def pick_device(requested: str) -> str:
    """`cuda` or `cpu`."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RunInputError("training.device is 'cuda', but CUDA is not available here")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def cpu_has_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU claims bf16 matrix instructions (avx512_bf16 or AMX)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


@functools.cache
def bf16_matmul_speedup() -> float:
    """How many times faster a training-sized bf16 matrix multiply runs than fp32 here, at torch's thread count.

    Measured, because the flags alone mislead: on one 2-core Xeon with avx512_bf16 (a VM) bf16 ran at
    0.6× fp32, on a 2-core EPYC 3.9×. About 30 ms, once per process.
    """
    import torch

    # Its own generator: drawing from torch's global one would shift every later random number of the
    # run (the first run in a process would then train differently from the next).
    generator = torch.Generator().manual_seed(0)

    def best_of(dtype: torch.dtype) -> float:
        a = torch.randn(*PROBE_SHAPE[:2], generator=generator).to(dtype)
        b = torch.randn(*PROBE_SHAPE[1:], generator=generator).to(dtype)
        a @ b  # warm-up: kernel selection, first-touch pages
        timings = []
        for _ in range(PROBE_REPEATS):
            began = time.perf_counter()
            for _ in range(PROBE_INNER):
                a @ b
            timings.append(time.perf_counter() - began)
        return min(timings)

    return best_of(torch.float32) / best_of(torch.bfloat16)


def memory_limit_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process may use: the machine's total, or a control group's limit where lower.

    A Home Assistant add-on runs in a container, whose limit (not the host's memory) is what counts.
    A limit on any group above this process's applies too. Reads cgroup v2 (`memory.max`) and v1
    (`memory.limit_in_bytes`); None where nothing can be read.
    """
    limits: list[int] = []
    try:
        meminfo = (proc / "meminfo").read_text(encoding="utf-8", errors="replace")
        kib = next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal:"))
        limits.append(int(kib) * 1024)
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    try:
        memberships = (proc / "self" / "cgroup").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        memberships = []
    for line in memberships:
        hierarchy, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            root, name = cgroups, "memory.max"
        elif "memory" in controllers.split(","):
            root, name = cgroups / "memory", "memory.limit_in_bytes"
        else:
            continue
        # The group, then each one above it up to the mount (in a container the mount is the group).
        directory = root / group.strip("/")
        while True:
            with contextlib.suppress(OSError, ValueError):  # missing, or "max" (no limit)
                limits.append(int((directory / name).read_text().strip()))
            if directory == root or root not in directory.parents:
                break
            directory = directory.parent
    return min(limits) if limits else None


def pick_precision(device: str, requested: str) -> str:
    """`bf16` or `fp32`: `auto` takes bf16 where the hardware does its matrix multiplies clearly faster.

    On a CPU only where the memory is there too: bf16 costs a run about 0.3 GB more at its peak.
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not cpu_has_bf16_flags():
        return "fp32"
    memory = memory_limit_bytes()
    if memory is not None and memory < BF16_MIN_MEMORY_BYTES:
        _LOGGER.info(
            "training in fp32: bf16 would raise the run's peak memory by about 0.3 GB, and this process may "
            "use %.1f GiB (bf16 takes at least %.0f GiB; set training.precision to force it)",
            memory / 2**30,
            BF16_MIN_MEMORY_BYTES / 2**30,
        )
        return "fp32"
    speedup = bf16_matmul_speedup()
    _LOGGER.info("bf16 matrix multiplies run %.2f× as fast as fp32 on this CPU", speedup)
    return "bf16" if speedup >= BF16_MIN_MATMUL_SPEEDUP else "fp32"


def agreed_precision(mine: str, sum_across_workers: SumAcrossWorkers) -> str:
    """One precision for a distributed run: bf16 only where every worker's `auto` chose it.

    Each worker decides on its own machine (its probe, its memory), and one run must not train in two.
    """
    chose_bf16, workers = sum_across_workers([1.0 if mine == "bf16" else 0.0, 1.0])
    return "bf16" if chose_bf16 == workers else "fp32"


def cpu_threads(requested: int) -> int:
    """Threads for torch: the requested number, else the cores this process may run on."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def return_freed_memory(collect: bool = False) -> None:
    """Hand freed heap pages back to the system (glibc's `malloc_trim`), after a garbage collection if asked.

    Batches of ever-changing shapes leave glibc's heap fragmented, so freed memory stays resident
    until trimmed; and a finished Trainer, its model and its optimizer sit in reference cycles that
    only the collector frees.
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_rss_mb(status: Path = Path("/proc/self/status")) -> float:
    """This process's peak resident memory so far, in MiB.

    Linux's `VmHWM`, the high-water mark of this process's own memory. Not `getrusage`'s
    `ru_maxrss`: Linux carries that over an exec from the process that started it, so a training
    process spawned by a big parent would report the parent's size (seen: 2,139 MiB for a 929 MiB run).
    """
    try:
        for line in status.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # not Linux: the best there is


def tokenize(
    tokenizer: Any,
    examples: Sequence[Example],
    source_max_tokens: int,
    target_max_tokens: int,
    on_chunk: Callable[[int], None] | None = None,
) -> list[dict[str, list[int]]]:
    """Token ids per example, truncated and never padded (the collator pads each batch to its own longest row)."""
    features: list[dict[str, list[int]]] = []
    for start in range(0, len(examples), TOKENIZE_CHUNK_EXAMPLES):
        chunk = examples[start : start + TOKENIZE_CHUNK_EXAMPLES]
        sources = tokenizer([ex.instruction for ex in chunk], max_length=source_max_tokens, truncation=True)
        targets = tokenizer(text_target=[ex.response for ex in chunk], max_length=target_max_tokens, truncation=True)
        features.extend(
            {"input_ids": ids, "attention_mask": mask, "labels": labels}
            for ids, mask, labels in zip(
                sources["input_ids"], sources["attention_mask"], targets["input_ids"], strict=True
            )
        )
        if on_chunk is not None:
            on_chunk(len(features))
    return features


def feature_lengths(features: Sequence[dict[str, list[int]]]) -> list[tuple[int, int]]:
    """(source, target) token counts per example."""
    return [(len(f["input_ids"]), len(f["labels"])) for f in features]


class TokenLoss:
    """Summed per-token cross-entropy of a batch, through the chunked output layer where there is one."""

    def __init__(self, head: torch.nn.Linear | None) -> None:
        self.head = head

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, labelled tokens); `output` holds hidden states when `head` is set, else logits."""
        import torch.nn.functional as F

        from homeiq_trainer.training.loss import linear_cross_entropy

        mask = labels.ne(LABEL_PAD)
        if self.head is not None:
            return linear_cross_entropy(output[mask], self.head.weight, labels[mask]), mask.sum()
        loss_sum = F.cross_entropy(
            output.float().reshape(-1, output.size(-1)), labels.reshape(-1), ignore_index=LABEL_PAD, reduction="sum"
        )
        return loss_sum, mask.sum()


def evaluate_loss(
    model: Any,
    features: Sequence[dict[str, list[int]]],
    collator: Any,
    batches: Sequence[Sequence[int]],
    token_loss: TokenLoss | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    reduce: SumAcrossWorkers = _alone,
) -> float:
    """Mean per-token cross-entropy over `features`, batch by batch (no dropout, no gradients, fp32).

    In a distributed run every worker passes its own share of `batches`; sums go through `reduce`.
    """
    import torch

    loss_of = token_loss or TokenLoss(None)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for done, batch_indices in enumerate(batches, start=1):
                batch = collator([features[i] for i in batch_indices])
                labels = batch.pop("labels").to(device)
                output = model(**{k: v.to(device) for k, v in batch.items()}).logits
                loss_sum, count = loss_of(output, labels)
                total += float(loss_sum)
                tokens += int(count)
                if on_batch is not None:
                    on_batch(done, len(batches))
    finally:
        model.train(was_training)
    total, summed_tokens = reduce([total, float(tokens)])
    return total / summed_tokens if summed_tokens else float("nan")


def load_base_model(base_model: str, device: str, bf16_weights: bool) -> tuple[Any, Any]:
    """(tokenizer, model) from a hub id or local directory; never runs code from the model repo."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    dtype = torch.bfloat16 if bf16_weights else torch.float32
    if base_model.startswith(("/", "./", "../", "~")) and not Path(base_model).expanduser().is_dir():
        # Else transformers takes it for a hub id and answers "Repo id must use alphanumeric chars".
        raise RunInputError(f"cannot load the base model {base_model}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
        model = AutoModelForSeq2SeqLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=False)
    except OSError:
        raise  # missing, unreadable or unreachable: the run reports it as such
    except Exception as exc:  # a corrupt weights file (SafetensorError), a config of another kind (ValueError)
        raise RunInputError(
            f"cannot load the base model {base_model}: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    fuse_tanh_gelu(model)
    return tokenizer, model.to(device)


class RunInputError(Exception):
    """What the run was given cannot be used (the base model's files, the LoRA targets, the device); one line."""


def check_tokenizer_reads(tokenizer: Any, features: Sequence[dict[str, Any]], base_model: str) -> None:
    """Refuse a tokenizer that turns most of the examples into <unk>.

    A model folder without its tokenizer files still loads, as an empty tokenizer that makes every
    word <unk>; a run would train, and serve, an adapter that reads nothing. Real tokenizers leave
    almost no <unk> in HomeIQ's text.
    """
    unk, special = tokenizer.unk_token_id, set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    if unk is None:
        return
    tokens = [i for feature in features[:UNK_CHECK_EXAMPLES] for i in feature["input_ids"] if i not in special]
    unknown = sum(1 for i in tokens if i == unk)
    if tokens and unknown > len(tokens) * MAX_UNK_SHARE:
        raise RunInputError(
            f"the tokenizer of {base_model} reads {unknown / len(tokens):.0%} of the examples' tokens as "
            f"{tokenizer.unk_token}: are its tokenizer files (tokenizer.json, spiece.model) missing?"
        )


def fuse_tanh_gelu(model: Any) -> int:
    """Swap transformers' Python tanh-GELU (`gelu_new`, T5's) for torch's fused kernel of the same formula.

    The Python one runs seven elementwise ops, and autograd keeps an input of each for backward:
    on flan-t5-small's gated feed-forward that was 113 MiB of a 1,024-token step's peak and 6% of its
    time. Returns how many were swapped.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def _with_adapter(base: Any, hp: Hyperparameters, resume_adapter: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if resume_adapter is not None:
        return PeftModel.from_pretrained(base, str(resume_adapter), is_trainable=True)
    lora = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.lora_target_modules),
    )
    try:
        return get_peft_model(base, lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise RunInputError(
            f"lora.target_modules do not fit the base model {hp.base_model}: {first_line(exc)}"
        ) from None


def _save(model: Any, tokenizer: Any, save_dir: Path) -> None:
    from safetensors import SafetensorError

    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(save_dir), safe_serialization=True)
    except SafetensorError as exc:
        # Its I/O errors (a full disk) are not OSErrors; make them one, so they fail the run in one line.
        raise OSError(str(exc)) from exc
    tokenizer.save_pretrained(str(save_dir))
    readable_by_transformers_4(save_dir / "tokenizer_config.json")


def readable_by_transformers_4(config_file: Path) -> None:
    """Rewrite what transformers 5 writes into `tokenizer_config.json` that transformers 4 cannot read.

    HomeIQ pins transformers below 5 and loads the adapter folder with `AutoTokenizer`; where that
    fails, it goes on without the adapter. transformers 5 writes T5's 100 `<extra_id_*>` tokens as a
    list under `extra_special_tokens`, where 4.x expects a mapping, and names a plain fast tokenizer
    `TokenizersBackend`, a class 4.x does not have. Under 4.x's key (`additional_special_tokens`) and
    name (`PreTrainedTokenizerFast`, which 5.x reads as the same class) both load the same tokens with
    the same ids.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    before = dict(config)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list) and all(isinstance(token, str) for token in extra):
        del config["extra_special_tokens"]
        named = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = list(dict.fromkeys([*named, *extra]))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if config != before:
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _denormals_flushed(device: str) -> Iterator[None]:
    """Subnormals as zeros while training on a CPU, then the default back.

    Subnormal floats (an untrained model's tiny gradients, far-off probabilities) take a slow path
    on x86; as zeros they change no figure worth keeping. The flag is global processor state, and
    the CLI, Ray workers and tests call the engine in their own process: it must not outlive the run.
    """
    import torch

    flushing = device == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def train_adapter(
    examples: Sequence[Example],
    hp: Hyperparameters,
    save_dir: Path,
    *,
    observer: TrainingObserver | None = None,
    stop: threading.Event | None = None,
    resume_adapter: Path | None = None,
    sum_across_workers: SumAcrossWorkers | None = None,
) -> TrainOutcome:
    """Fine-tune a LoRA adapter on `examples` and save it (with the tokenizer) to `save_dir`.

    Keeps the adapter with the lowest held-out loss. Returns early with `cancelled=True`, saving
    nothing, when `stop` is set. Inside a distributed run (the Ray backend) every worker calls this
    with the same examples and a `sum_across_workers`; the figures it returns are then those of all
    workers together.
    """
    import torch
    from transformers.utils import logging as hf_logging

    watcher: TrainingObserver = observer or NullObserver()
    stopper: threading.Event = stop or threading.Event()
    hf_logging.set_verbosity_error()
    torch.manual_seed(hp.seed)
    device = pick_device(hp.device)
    if device == "cpu":
        torch.set_num_threads(cpu_threads(hp.threads))
    precision = pick_precision(device, hp.precision)  # measured at the run's own thread count
    if sum_across_workers is not None and hp.precision == "auto":
        precision = agreed_precision(precision, sum_across_workers)
    with _denormals_flushed(device):
        outcome = _train(
            examples, hp, save_dir, watcher, stopper, resume_adapter, sum_across_workers, device, precision
        )
    # Freed now, or the evaluation that follows in this process loads its own base model on top of
    # the trained one: the peak of a 2,000-example fp32 run was 1,162 MiB that way, and is 897 MiB.
    return_freed_memory(collect=True)
    return outcome


def _train(
    examples: Sequence[Example],
    hp: Hyperparameters,
    save_dir: Path,
    watcher: TrainingObserver,
    stopper: threading.Event,
    resume_adapter: Path | None,
    sum_across_workers: SumAcrossWorkers | None,
    device: str,
    precision: str,
) -> TrainOutcome:

    from homeiq_trainer.training.loss import hidden_states_out
    from homeiq_trainer.training.session import TrainingSession

    started, started_cpu = time.monotonic(), time.process_time()

    watcher.phase(Phase.LOADING_MODEL, f"loading {hp.base_model} on {device} ({precision})")
    # On CUDA the weights themselves are bf16; on a CPU they stay fp32 and matrix multiplies autocast.
    tokenizer, base = load_base_model(hp.base_model, device, bf16_weights=device == "cuda" and precision == "bf16")
    model = _with_adapter(base, hp, resume_adapter)

    train_set, eval_set = split_examples(examples, hp.eval_fraction, hp.min_eval_examples)
    total = len(train_set) + len(eval_set)

    def tokenized(done: int) -> None:
        watcher.phase(Phase.LOADING_MODEL, f"tokenized {done} of {total} examples")

    train_features = tokenize(tokenizer, train_set, hp.source_max_tokens, hp.target_max_tokens, tokenized)
    check_tokenizer_reads(tokenizer, train_features, hp.base_model)
    eval_features = tokenize(
        tokenizer, eval_set, hp.source_max_tokens, hp.target_max_tokens, lambda done: tokenized(len(train_set) + done)
    )
    reduce = sum_across_workers or _alone
    meter = _LossMeter(reduce=reduce)
    with hidden_states_out(base) as head:
        session = TrainingSession(
            model=model,
            base=base,
            tokenizer=tokenizer,
            hp=hp,
            device=device,
            precision=precision,
            save_dir=save_dir,
            meter=meter,
            token_loss=TokenLoss(head),
            watcher=watcher,
            stopper=stopper,
            reduce=reduce,
            started=started,
            started_cpu=started_cpu,
        )
        trainer = session.trainer(train_features, eval_features)
        if session.stopping():
            return _cancelled(len(train_features), len(eval_features), [], device)
        watcher.phase(Phase.TRAINING, f"{len(train_features)} examples, {session.total_steps} steps, {precision}")
        train_started, train_cpu_started = time.monotonic(), time.process_time()
        trainer.train()
        runtime, train_cpu_s = time.monotonic() - train_started, time.process_time() - train_cpu_started
        meter.close_epoch()
        if session.stopping():
            return _cancelled(len(train_features), len(eval_features), session.history, device)
        eval_loss = session.finish_evaluation(trainer.state)

    watcher.phase(Phase.SAVING, "writing adapter")
    _save(model, tokenizer, save_dir)
    best = session.best
    real_tokens, padded_tokens, processed = meter.totals()
    return TrainOutcome(
        cancelled=False,
        train_examples=len(train_features),
        eval_examples=len(eval_features),
        final_loss=meter.last_epoch_mean,
        eval_loss=eval_loss,
        loss_history=session.history,
        train_runtime_s=round(runtime, 3),
        train_samples_per_second=round(processed / runtime, 3) if runtime > 0 else 0.0,
        padding_efficiency=round(real_tokens / padded_tokens, 4) if padded_tokens else None,
        device=device,
        steps=trainer.state.global_step,
        precision=precision,
        train_cpu_s=round(train_cpu_s, 3),
        peak_rss_mb=peak_rss_mb(),
        eval_history=best.history if best else [],
        best_step=best.best_step if best else None,
        stopped_early=bool(best and best.stopped_early),
    )


def _cancelled(n_train: int, n_eval: int, history: list[dict[str, float]], device: str) -> TrainOutcome:
    return TrainOutcome(
        cancelled=True,
        train_examples=n_train,
        eval_examples=n_eval,
        final_loss=None,
        eval_loss=None,
        loss_history=history,
        train_runtime_s=0.0,
        train_samples_per_second=0.0,
        padding_efficiency=None,
        device=device,
        steps=0,
    )
