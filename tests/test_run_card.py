"""The model card of a `distill run` holds where the model came from and its figures, with a model-index block the
Hub reads (issue 46)."""
from __future__ import annotations

import yaml

from distill.metrics import PairedComparison
from distill.run_card import RunFacts, run_model_card


def test_the_card_holds_the_provenance_the_gains_and_a_model_index_of_the_students_metrics():
    after = {"ndcg@10": 0.8053, "mrr@10": 0.7631, "recall@1": 0.6685, "recall@5": 0.8887, "recall@10": 0.9358,
             "recall@100": 0.9935, "map@100": 0.7661}
    before = {k: v - 0.01 for k, v in after.items()}
    control = {k: v - 0.004 for k, v in after.items()}
    facts = RunFacts(
        base_model="sentence-transformers/all-MiniLM-L6-v2", teacher="HuggingFaceTB/SmolLM2-135M-Instruct",
        supervision="answers (240 train queries without qrels, 240 with reference answers)",
        positives="answer-match+teacher", pool_size=8, queries_kept=117, queries_left_out={"no negatives": 3},
        eval_data="squad-qa", eval_split="test", eval_queries=4905, before=before, after=after,
        gain=PairedComparison(4905, 0.0135, 0.0106, 0.0164, 0.0002, 0.95), control_name="self-training",
        control=control, control_gain=PairedComparison(4905, 0.0094, 0.006, 0.012, 0.0004, 0.95),
        teacher_added=PairedComparison(4905, 0.0041, 0.0016, 0.0066, 0.002, 0.95),
        check={"teacher ranks the known positive first": "41 of 50 (82%, 95% CI 69% to 90%)"},
        loss="rank_filter:1.0,infonce:0.2")
    card = run_model_card(facts)
    front = yaml.safe_load(card.split("---")[1])
    result = front["model-index"][0]["results"][0]
    assert result["task"]["type"] == "information-retrieval" and result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]}["cosine_ndcg@10"] == 0.8053
    assert len(result["metrics"]) == 7 and front["base_model"] == facts.base_model
    for text in ("| teacher | HuggingFaceTB/SmolLM2-135M-Instruct |", "| positives | `answer-match+teacher` |",
                 "| pool size | 8 |", "| queries kept | 117 (left out: 3 no negatives) |",
                 "41 of 50 (82%, 95% CI 69% to 90%)", "squad-qa (test), 4905 queries",
                 "| what the teacher added (this model against self-training) | +0.41 (95% CI +0.16 to +0.66, "
                 "paired randomization p = 0.002, 4905 queries) |",
                 "| self-training | 80.13 |"):
        assert text in card, text
