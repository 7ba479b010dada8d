"""The experiment on a user's Hugging Face checkpoint folder (``[model] checkpoint = "<folder>"``).

Tiny random GPT-2-style and BERT-style checkpoints with their own subword tokenizers
(``tests.hf_fixtures``) go through ``subroutine-circuits run``: all three inits, masks, the
ablation matrix and patching, on whichever TransformerLens is installed (3.9: HookedTransformer /
HookedEncoder; 4.x: TransformerBridge). Other tests check the pieces against independent code:
the inits' weights, the stored base model, the folder's tokenizer, pair alignment counts.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from subroutine_circuits.adapters import as_adapter
from subroutine_circuits.experiment import config_from_dict, hf
from subroutine_circuits.experiment.config import load_config
from subroutine_circuits.experiment.data import prepare
from subroutine_circuits.experiment.search import encode
from subroutine_circuits.tasks.hf_tokenizer import HFTaskTokenizer
from tests.hf_fixtures import *  # noqa: F403  (pytest fixtures: gpt2_folder, bert_folder, ...)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
INITS = ["trained", "pretrained", "random_init"]
N_PAIRS = 4


def tiny_toml(checkpoint: Path) -> str:
    """A config that runs every stage in seconds (the numbers are not the point here)."""
    return f"""
task = "agreement_singular"
inits = {json.dumps(INITS)}
base_seeds = [0]
mask_seeds = [0]
min_composite_acc = 0.0
patching_pairs = {N_PAIRS}
[model]
checkpoint = "{checkpoint}"
[data]
n_train = 24
n_val = 8
n_test = 8
[train]
max_steps = 3
eval_every = 3
lr = 1e-3
warmup_steps = 1
[mask]
steps = 3
batch_size = 8
grid = [{{l0_weight = 1.0}}]
[patching_options]
fractions = [0.0, 1.0]
"""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def cli_run(request, tmp_path_factory):
    """``subroutine-circuits run`` on a config pointing at each checkpoint folder, once."""
    from subroutine_circuits.cli import main

    folder = request.getfixturevalue(f"{request.param}_folder")
    root = tmp_path_factory.mktemp(f"run_{request.param}")
    config = root / "exp.toml"
    config.write_text(tiny_toml(folder))
    out = root / "out"
    assert main(["run", str(config), "--out", str(out), "--device", "cpu"]) == 0
    return request.param, folder, config, out


def test_run_completes_every_init_with_masks_and_patching(cli_run):
    kind, folder, _, out = cli_run
    rows = _read_csv(out / "results.csv")
    assert sorted((r["init"], r["subroutine"]) for r in rows) == sorted(
        (i, s) for i in INITS for s in ("subject_plural", "verb_plural")
    )
    for r in rows:
        assert r["model"] == "checkpoint"
        for col in ("full_target_acc", "sub_target_acc", "abl_target_acc", "abl_other_acc"):
            assert 0.0 <= float(r[col]) <= 1.0, (col, r[col])
        assert (out / r["mask_path"]).is_file()
    for init in INITS:
        model_dir = out / "models" / f"agreement_singular__{init}__s0"
        info = json.loads((model_dir / hf.BASE_INFO_FILE).read_text())
        assert info["checkpoint"] == str(folder)
        meta = json.loads((model_dir / hf.BASE_META_FILE).read_text())
        assert meta["init"] == init
        assert ("reinitialised_from" in meta) == (init != "pretrained")
        assert ("best_val_acc" in meta) == (init != "random_init")
    patch = _read_csv(out / "patching.csv")
    # default patching_inits: trained and pretrained; 2 subroutines x 2 methods each
    assert len(patch) == 2 * 2 * 2
    assert {r["method"] for r in patch} == {"activation", "attribution"}
    for r in patch:
        n_pairs, n_unaligned = int(r["n_pairs"]), int(r["n_unaligned"])
        # subword pairs: up to 4x N_PAIRS are drawn, the first N_PAIRS that align are used and
        # the ones skipped before them counted
        assert 1 <= n_pairs <= N_PAIRS and 0 <= n_unaligned <= 4 * N_PAIRS - n_pairs
        assert math.isfinite(float(r["clean_metric"]))
        assert 0.0 <= float(r["abl_target_acc"]) <= 1.0


def test_stored_base_model_reloads_with_its_accuracy(cli_run):
    """Resumption loads the stored model: same composite test accuracy as recorded."""
    _, _, config, out = cli_run
    cfg = load_config(config)
    prep = prepare(cfg)
    model, tok, meta = hf.load_base(out / "models" / "agreement_singular__trained__s0")
    assert isinstance(tok, HFTaskTokenizer)
    adapter = as_adapter(model, tokenizer=tok).freeze()
    acc = adapter.accuracy(encode(adapter, prep.splits["test"]["composite"]))
    assert acc == pytest.approx(meta["composite_acc"], abs=1e-9)
    # and a second run finds everything done (the stored files are reused, not rebuilt)
    from subroutine_circuits.cli import main

    before = (out / "results.csv").read_text()
    assert main(["run", str(config), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "results.csv").read_text() == before


def _hidden(model, tok, texts):
    adapter = as_adapter(model, tokenizer=tok)
    with torch.no_grad():
        return adapter.embed(adapter.encode_stimuli(texts))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_inits_of_a_checkpoint(request, kind):
    """pretrained = the folder's weights (equal to the HF model); trained / random_init = the
    architecture re-initialised under the base seed (same seed, same weights)."""
    from tests.hf_fixtures import load_hf_reference

    folder = request.getfixturevalue(f"{kind}_folder")
    cfg = config_from_dict({"model": {"checkpoint": str(folder)}})
    texts = ["the horse runs", "the dogs near the cat sleep"]
    models = {
        (init, seed): hf.initial_model(cfg, init, seed, "cpu")
        for init, seed in [("pretrained", 0), ("trained", 0), ("random_init", 0), ("trained", 1)]
    }
    tok = hf.task_tokenizer(folder)
    h = {key: _hidden(m, tok, texts) for key, (m, _) in models.items()}
    tokens, lengths = tok.encode_batch(texts)
    ref = load_hf_reference(folder)
    body = ref.transformer if hasattr(ref, "transformer") else ref.bert
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        want = body(input_ids=tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(
        h["pretrained", 0], want[torch.arange(2), lengths - 1], atol=2e-5, rtol=0
    )
    torch.testing.assert_close(h["trained", 0], h["random_init", 0], atol=0, rtol=0)
    assert (h["trained", 0] - h["pretrained", 0]).abs().max() > 1e-3
    assert (h["trained", 0] - h["trained", 1]).abs().max() > 1e-3
    meta = models["random_init", 0][1]
    assert meta["reinitialised_from"] == str(folder) and meta["checkpoint"] == str(folder)


def test_prepare_encodes_with_the_folder_tokenizer(gpt2_folder, bpe_tokenizer):
    cfg = config_from_dict({"model": {"checkpoint": str(gpt2_folder)}, "data": {"n_train": 20}})
    prep = prepare(cfg)
    tok = prep.tokenizer
    assert isinstance(tok, HFTaskTokenizer) and tok.source == str(gpt2_folder)
    text = prep.splits["train"]["composite"][0].stimuli[0]
    ids = tok.encode(text)
    eot = bpe_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # BOS, the tokenizer's own encoding of the text, the appended readout token
    assert ids == [eot, *bpe_tokenizer(text, add_special_tokens=False)["input_ids"], eot]
    assert len(ids) - 2 > len(text.split())  # the small BPE splits some words into pieces


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_users_data_file_with_a_checkpoint_tokenizer(request, kind):
    """A user's JSONL task (words the tokenizer never saw) runs through the folder's tokenizer:
    every stimulus ends in the readout token, and problems score."""
    folder = request.getfixturevalue(f"{kind}_folder")
    cfg = config_from_dict(
        {
            "task": str(EXAMPLES / "user_task.jsonl"),
            "rule": {"subject_animal": True, "negated": False},
            "model": {"checkpoint": str(folder)},
            "data": {"n_train": 12, "n_val": 4, "n_test": 4},
        }
    )
    prep = prepare(cfg)
    model, _ = hf.load_hf_model(folder)
    adapter = as_adapter(model, tokenizer=prep.tokenizer).freeze()
    data = encode(adapter, prep.splits["test"]["composite"])
    tokens, lengths = data.inputs["tokens"], data.inputs["lengths"]
    last = tokens.gather(-1, (lengths - 1).unsqueeze(-1))
    assert (last == prep.tokenizer.readout_id).all()
    assert 0.0 <= adapter.accuracy(data) <= 1.0


def test_training_defaults_and_overrides():
    tcfg = hf.train_config({}, seed=3, device="cpu")
    for key, value in hf.HF_TRAIN_DEFAULTS.items():
        assert getattr(tcfg, key) == value
    assert tcfg.seed == 3 and tcfg.progress is False
    cfg = config_from_dict({"train": {"lr": 3e-5, "warmup_steps": 7}})
    tcfg = hf.train_config(dict(cfg.train), seed=0, device="cpu")
    assert (tcfg.lr, tcfg.warmup_steps, tcfg.batch_size) == (3e-5, 7, 16)


def test_training_on_the_composite_task_lowers_the_loss(gpt2_folder):
    """train_composite fits a checkpoint base model: training loss falls on a fixed batch."""
    cfg = config_from_dict({"model": {"checkpoint": str(gpt2_folder)}, "data": {"n_train": 32}})
    prep = prepare(cfg)
    model, _ = hf.load_hf_model(gpt2_folder, reinit_seed=0)
    adapter = as_adapter(model, tokenizer=prep.tokenizer)
    train = encode(adapter, prep.splits["train"]["composite"])
    val = encode(adapter, prep.splits["val"]["composite"])
    tcfg = hf.train_config(
        {"lr": 3e-3, "max_steps": 16, "eval_every": 8, "batch_size": 32}, 0, "cpu"
    )

    def loss() -> float:
        with torch.no_grad():
            scores = adapter.ooo_logits(train.inputs)
        return float(torch.nn.functional.cross_entropy(scores, train.odd))

    before = loss()
    res = hf.train_composite(adapter, train, val, tcfg)
    assert res.steps == 16 and not model.training
    assert loss() < before


def test_load_model_gives_the_right_adapter(gpt2_folder, bert_folder):
    from subroutine_circuits import load_model
    from subroutine_circuits.models.tl_compat import tl_major

    for folder, kind in ((gpt2_folder, "causal"), (bert_folder, "encoder")):
        adapter = load_model(folder, device="cpu")
        want = "bridge" if tl_major() >= 4 else "transformer_lens"
        assert adapter.family == want
        assert isinstance(adapter.tokenizer, HFTaskTokenizer) and adapter.tokenizer.kind == kind
        emb = adapter.embed(adapter.encode_stimuli(["the horse runs"]))
        assert emb.shape == (1, 32)


def test_relative_checkpoint_path_resolves_against_the_config(tmp_path, gpt2_folder):
    import shutil

    shutil.copytree(gpt2_folder, tmp_path / "ckpt")
    (tmp_path / "exp.toml").write_text('[model]\ncheckpoint = "ckpt"\n')
    cfg = load_config(tmp_path / "exp.toml")
    assert cfg.model.checkpoint == str((tmp_path / "ckpt").resolve())


def test_bad_checkpoint_folder_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = config_from_dict({"model": {"checkpoint": str(tmp_path)}})
    with pytest.raises(ValueError, match="no weights file"):
        prepare(cfg)


def test_patching_pairs_align_at_word_boundaries(gpt2_folder, bpe_tokenizer):
    """Unaligned pairs are counted, not dropped silently: with GPT-2's byte-level BPE (words
    tokenised independently after the space), a minimal pair aligns exactly when both texts
    have the same number of tokens."""
    from subroutine_circuits.experiment.patching import PatchingConfig, build_pair_data
    from subroutine_circuits.tasks import get_task

    task = get_task("agreement_singular")
    model, tok = hf.load_hf_model(gpt2_folder)
    adapter = as_adapter(model, tokenizer=tok).freeze()
    pcfg = PatchingConfig(n_pairs=24, seed=5, kinds=("head",))

    def n_tokens(text):
        return len(bpe_tokenizer(text, add_special_tokens=False)["input_ids"])

    total_unaligned = 0
    for sub in task.predicates:
        scoring, faith = build_pair_data(adapter, tok, task, sub, pcfg)
        for data in (scoring, faith):
            # enough pairs align among the 4x drawn; every kept pair aligns, every skipped not
            assert data.n_pairs == 24
            assert all(n_tokens(a) == n_tokens(b) for a, b in data.texts)
            assert all(n_tokens(a) != n_tokens(b) for a, b, _ in data.unaligned)
            assert sum(b.clean_tokens.shape[0] for b in data.batches) == data.n_pairs
            total_unaligned += data.n_unaligned
        assert not set(scoring.texts) & set(faith.texts)  # disjoint scoring / faithfulness
    assert total_unaligned > 0  # the small BPE does split some pairs differently
    # the word-level tokenizer of the built-in task aligns every pair
    word, _ = build_pair_data_word(task, pcfg)
    assert word.n_unaligned == 0 and word.n_pairs == 24


def build_pair_data_word(task, pcfg):
    """Pair data of a small native model with the task's own word tokenizer."""
    from subroutine_circuits.experiment.patching import build_pair_data
    from subroutine_circuits.models.presets import ModelSpec
    from subroutine_circuits.models.tl_compat import make_native_model

    tok = task.tokenizer()
    model = make_native_model(ModelSpec("tiny", n_ctx=32), tok.vocab_size, seed=0)
    return build_pair_data(as_adapter(model, tokenizer=tok), tok, task, "verb_plural", pcfg)
