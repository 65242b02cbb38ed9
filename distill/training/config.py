"""`distill train`'s settings: one dataclass, whose fields are the command's flags and YAML keys.

Settings marked `volatile` do not change what a run computes (progress bars, where the cache is, the device, the
memory budget): a resumed or repeated run may change those; any other change is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from labelers.errors import UsageError

from ..encoding import EncodingSettings
from ..losses import LOSSES, Objective
from ..negatives.settings import WindowSettings
from ..supervision import SuppliedData
from .positives import POSITIVE_MODES


@dataclass(kw_only=True)
class TrainConfig(EncodingSettings, WindowSettings):
    model: str = field(metadata={"help": "student to start from: our folder, a sentence-transformers folder or a HF encoder"})
    data: list[str] = field(metadata={"help": "BEIR-style folder(s); several = several tasks, one task per batch"})
    output: Path = field(metadata={"help": "folder for the trained model, checkpoints, log and plot"})
    labels: list[Path] | None = field(default=None, metadata={
        "help": "teacher labels (distill label), one per --data; rewards for the soft-label losses"})
    candidates: list[Path] | None = field(default=None, metadata={
        "help": "instead of --labels: candidates (distill mine), one per --data; hard labels only: the qrels "
                "positive, or with --positives retriever-top1 each pool's best-scored candidate (self-training)"})
    split: str = field(default="train", metadata={"help": "qrels split to train on"})
    loss: str = field(default="rank_filter", metadata={
        "help": f"objective: loss[:weight],...  from {sorted(LOSSES)} (e.g. rank_filter, kl:1.0,infonce:0.2); "
                "simcse alone trains on the corpus passages (no queries, no negatives: each passage encoded twice)"})
    temperature: float = field(default=0.05, metadata={"help": "τ in s(q,k) = <e_q, e_k> / τ"})
    teacher_temperature: float = field(default=1.0, metadata={"help": "T_t in softmax(r / T_t)"})
    student_temperature: float = field(default=1.0, metadata={"help": "T_s in the KL loss's softmax(s / T_s)"})
    num_negatives: int = field(default=7, metadata={"help": "negatives per query (group size - 1); 0 = in-batch only"})
    positive: str = field(default="first", metadata={"help": "slot-0 positive when a query has several: the first "
                                                               "or the one the teacher rewards most",
                                                       "choices": ["first", "teacher"]})
    positives: str = field(default="auto", metadata={
        "help": "with --labels (with --candidates: qrels or retriever-top1): where each query's positive comes "
                "from: its qrels, or chosen from its pool by the "
                "teacher's reward, the teacher fused with the retriever (z-normalised sums), the pool's first passage "
                "containing a reference answer (DPR), answer matches ranked by the fused score, or the retriever's top "
                "1; auto: qrels where a query has them, else answer-match+teacher with answers, else "
                "teacher+retriever", "choices": ["auto", *POSITIVE_MODES]})
    min_positive_margin: float = field(default=0.0, metadata={
        "help": "a chosen positive must beat its pool's second best by this much (z units); less and the query is "
                "left out (counted)"})
    false_negatives: str = field(default="keep", metadata={
        "help": "with qrels: mined negatives the teacher rewards above the positive by --false-negative-margin are "
                "kept, dropped, or made extra positives (RLHN)", "choices": ["keep", "drop", "positive"]})
    false_negative_margin: float = field(default=0.0, metadata={"help": "see --false-negatives (nats/token)"})
    answer_negatives: str = field(default="keep", metadata={
        "help": "with --positives answer-match[+teacher]: pool passages that contain a reference answer but are not "
                "the chosen positive stay negatives (keep), or are left out of the query's negatives and masked "
                "in-batch (drop: DPR's hard negatives hold no answer; RocketQA's denoising)",
                "choices": ["keep", "drop"]})
    drop_disputed: bool = field(default=False, metadata={
        "help": "with --labels: leave out a query whose teacher rewards one of its negatives at least as high as its "
                "positive (for synthetic queries: one that fits another passage as well; InPars-v2's reranker filter)"})
    keep_top_margin: float = field(default=1.0, metadata={
        "help": "with --labels: train on this share of the queries, those the teacher confirms most clearly (largest "
                "r(q,d+) - max r(q,d-); InPars-v2 keeps its reranker's top synthetic queries); 1.0 keeps all"})
    batch_dedup: str = field(default="positives", metadata={
        "help": "what may not repeat within a batch: positives (no positive is another query's key) or strict "
                "(no passage twice) or none; a query's own positives are masked out of its in-batch keys in every mode",
                "choices": ["positives", "strict", "none"]})
    train_batch_size: int = field(default=32, metadata={"help": "queries per step over all devices"})
    epochs: int = field(default=1, metadata={"help": "passes over the examples"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warm-up"})
    scheduler: str = field(default="linear", metadata={"help": "decay after warm-up",
                                                       "choices": ["linear", "cosine", "constant"]})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 (else fp16) autocast on GPUs, fp32 on CPUs",
                                                     "choices": ["auto", "fp32", "bf16", "fp16"]})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    grad_cache_chunk_size: int | None = field(default=None, metadata={
        "help": "GradCache: encode this many texts at a time with cached gradients (big batches, small memory)"})
    micro_batch_tokens: int | None = field(default=None, metadata={"volatile": True, "help":
        "a batch's texts are sorted by length and encoded in forward passes of at most this many (padded) tokens: "
        "the same loss with far less padding (dropout masks differ); default 2048 on a CPU, 32768 on a GPU; "
        "0: one forward per kind in batch order"})
    eval_split: str | None = field(default=None, metadata={"help": "qrels split evaluated during training (e.g. dev)"})
    eval_data: str | None = field(default=None, metadata={"help": "folder of --eval-split (default: the first --data)"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: before and after only)"})
    eval_metric: str = field(default="ndcg@10", metadata={"help": "metric that picks the best checkpoint"})
    save_steps: int = field(default=100, metadata={"help": "write the resumable checkpoint every N steps"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, negative draws and dropout"})
    resume: bool = field(default=False, metadata={"volatile": True, "help": "continue from OUTDIR/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"volatile": True, "help": "delete OUTDIR's previous run and start again"})
    remine_steps: int = field(default=0, metadata={"help": "ANCE: re-mine every pool with the student every N steps"})
    dynamic_remine: bool = field(default=False, metadata={
        "help": "Conan-Embedding: re-mine examples whose mean negative score s has s*1.15 < s_0 and |s| < 0.8"})
    dynamic_remine_steps: int = field(default=100, metadata={"help": "how often the dynamic rule is checked"})
    remine_strategy: str = field(default="dense", metadata={"help": "how re-mined negatives are picked",
                                                            "choices": ["dense", "simans"]})
    remine_pool_size: int | None = field(default=None, metadata={"help": "candidates kept per query when re-mining "
                                                                         "(default: --num-negatives)"})
    skip_invalid: bool = field(default=False, metadata={"help": "skip and count invalid records instead of stopping"})
    allow_partial: bool = field(default=False, metadata={"volatile": True, 
        "help": "train on a --labels/--candidates file whose job has not finished (its progress file says so)"})
    memory_budget_gb: float | None = field(default=None, metadata={"volatile": True, 
        "help": "activation memory a step may use; above it GradCache goes on (default: 60%% of the free RAM, "
                "or of the free GPU memory)"})
    show_progress: bool = field(default=True, metadata={"volatile": True, "help": "progress bar"})

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        for name in ("labels", "candidates"):
            value = getattr(self, name)
            if value is not None:
                value = [value] if isinstance(value, (str, Path)) else list(value)
                if len(value) != len(self.data):
                    raise UsageError(f"--{name} needs one file per --data ({len(self.data)}), got {len(value)}")
                setattr(self, name, [Path(v) for v in value])
        if self.labels and self.candidates:
            raise UsageError("give --labels or --candidates, not both")
        # the retriever's top 1 needs only the pools' retriever scores, which a candidates file holds
        without_rewards = ("auto", "qrels", "retriever-top1") if self.candidates else ("auto", "qrels")
        if (self.drop_disputed or self.keep_top_margin < 1.0 or self.positives not in without_rewards
                or self.false_negatives != "keep" or self.answer_negatives != "keep") and not self.labels:
            raise UsageError("--drop-disputed, --keep-top-margin, --positives, --false-negatives and "
                             "--answer-negatives need the teacher's rewards: give --labels (from distill label)")
        if self.answer_negatives != "keep" and self.positives not in ("auto", "answer-match", "answer-match+teacher"):
            raise UsageError(f"--answer-negatives {self.answer_negatives} needs answer matching: --positives "
                             f"answer-match, answer-match+teacher or auto, not {self.positives}")
        if not 0.0 < self.keep_top_margin <= 1.0:
            raise UsageError(f"--keep-top-margin must be in (0, 1], got {self.keep_top_margin}")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1 or self.num_negatives < 0:
            raise UsageError("--train-batch-size and --gradient-accumulation-steps must be >= 1, "
                             "--num-negatives >= 0")
        if not 0.0 <= self.weight_decay < 1.0:  # AdamW multiplies the weights by 1 - lr * decay each step
            raise UsageError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UsageError(f"--warmup-ratio is a share of the steps, in [0, 1], got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise UsageError(f"--max-grad-norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}")
        for name in ("temperature", "teacher_temperature", "student_temperature", "learning_rate"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "save_steps", "logging_steps", "dynamic_remine_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.objective().passages_only:
            if self.labels or self.candidates or self.remine_steps or self.dynamic_remine:
                raise UsageError(f"--loss {self.loss} trains on the corpus passages alone: --labels, --candidates "
                                 "and re-mining do not apply")
            self.num_negatives = 0  # a group of one, the passage's second view; the batch's others are negatives
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 0:
            raise UsageError(f"--micro-batch-tokens must be >= 0, got {self.micro_batch_tokens}")
        for name in ("max_steps", "grad_cache_chunk_size", "remine_pool_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise UsageError(f"--memory-budget-gb must be > 0, got {self.memory_budget_gb}")

    def check_against(self, data: SuppliedData) -> None:
        """Refuse modes that `data` makes impossible or a silent no-op (a user who asked for one would think it
        worked)."""
        if self.candidates and self.positives == "retriever-top1" and data.labelled:
            raise UsageError(f"--candidates with --positives retriever-top1 (self-training) is for queries without "
                             f"qrels; {data.where} has qrels, whose positives mining leaves out of the pools: train "
                             "on the qrels (--positives auto)")
        if self.candidates and self.positives != "retriever-top1" and not data.labelled:
            raise UsageError(f"--candidates trains on each query's qrels positive; {data.where} has no qrels: take "
                             "each pool's best-scored candidate instead (--positives retriever-top1, "
                             "self-training), or give --labels")
        if not self.labels:
            return
        if self.positives == "qrels" and not data.labelled:
            raise UsageError(f"--positives qrels: {data.where} has no qrels; choose a mode that picks positives "
                             "from the pool (auto, teacher, teacher+retriever, answer-match+teacher...)")
        if self.false_negatives != "keep" and not data.labelled:
            raise UsageError(f"--false-negatives {self.false_negatives} compares the mined negatives with the qrels "
                             f"positive; {data.where} has no qrels (keep is the only choice)")
        if data.answers is False and self.positives == "answer-match":
            raise UsageError(f"--positives answer-match matches reference answers; {data.where} has none (or uses "
                             "none): use teacher, teacher+retriever or auto")
        if data.answers is False and self.answer_negatives != "keep":
            raise UsageError(f"--answer-negatives {self.answer_negatives} takes answer-holding passages out of the "
                             f"negatives; {data.where} has no reference answers (or uses none)")

    def objective(self) -> Objective:
        return Objective.parse(self.loss)

    def query_kind(self) -> str:
        """How the first text of each example is encoded: as a query, or (SimCSE) as the passage it is."""
        return "passage" if self.objective().passages_only else "query"
