"""The gym on a local Hugging Face folder: `experiment run --base FOLDER --scope-map llama`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import make_llama
from test_experiments import TINY
from tokenizers import (
    ByteLevelBPETokenizer,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from layerfed.clients.encoding import encode_pair
from layerfed.clients.events import Demonstration
from layerfed.clients.supervised import encode_demonstrations
from layerfed.governance.loader import load_policy
from layerfed.simulation.base_folder import BaseFolderError, base_folder, check_tokenizer
from layerfed.simulation.experiments import (
    EXPERIMENTS_DIR,
    load_experiment,
    plan_experiment,
    run_experiments,
)
from layerfed.simulation.lexicon import WORDS
from layerfed.simulation.tiny import build_tiny_tokenizer

EXPERIMENT = {
    **TINY,
    "name": "tiny_hf",
    "question": "Do the gym's layers train on a Llama folder?",
    "arms": [*TINY["arms"], {"name": "late", "base": "tiny-untaught"}],
}
"""test_experiments.py's two-arm, two-round experiment, plus an arm naming another base."""


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama (hidden 32) saved with a tokenizer knowing the world."""
    return make_llama(tmp_path_factory.mktemp("llama"), words=[*WORDS, ","])


def _spec(tmp_path: Path, data: dict[str, Any] = EXPERIMENT) -> Any:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_experiment(path)


def test_every_arm_runs_on_the_folder_with_mapped_scopes(llama: Path, tmp_path: Path) -> None:
    """With a base folder every arm's policy names it; the llama map rewrites each GPT-2
    scope and red line (fused c_attn into q, k and v; wpe dropped), leaving none behind."""
    spec = load_experiment(EXPERIMENTS_DIR / "early_late.yaml")
    plans = plan_experiment(spec, 1, tmp_path, base_folder(llama, "llama"))
    for plan in plans:
        policy = load_policy(plan.settings.policy)
        assert policy.base_model.path == str(llama.resolve())
        patterns = [p for layer in policy.layers for p in layer.scope.include]
        patterns += list(policy.red_lines.parameters)
        assert not [p for p in patterns if p.startswith("transformer.")]
        creator = policy.layer("creator").scope.include
        assert "model.layers.*.self_attn.v_proj.weight" in creator
        assert "model.embed_tokens.weight" in policy.red_lines.parameters


def test_unmapped_scopes_are_refused_naming_fields_and_the_models_names(
    llama: Path, tmp_path: Path
) -> None:
    """Without a scope map the GPT-2 scopes match nothing: refused before any run, with the
    policy field, the model's LoRA targets and the --scope-map fix named."""
    with pytest.raises(BaseFolderError) as caught:
        run_experiments([_spec(tmp_path)], 1, tmp_path / "out", base=base_folder(llama))
    message = str(caught.value)
    assert "layers[0].scope: layer 'creator'" in message
    assert "red_lines.parameters[0]" in message
    assert "model.layers.*.mlp.down_proj.weight" in message
    assert "--scope-map llama" in message
    assert not (tmp_path / "out" / "tiny_hf" / "default" / "seed-0" / "gym.json").exists()


def test_a_folder_without_config_or_a_bad_map_is_refused(llama: Path, tmp_path: Path) -> None:
    """--base needs config.json; --scope-map needs 'pattern: [patterns]' or a shipped name."""
    with pytest.raises(BaseFolderError, match=r"--base: expected .*config\.json"):
        base_folder(tmp_path)
    bad = tmp_path / "map.yaml"
    bad.write_text("transformer.wte.weight: model.embed_tokens.weight\n")
    with pytest.raises(BaseFolderError, match=r"--scope-map .*expected a mapping"):
        base_folder(llama, str(bad))
    with pytest.raises(BaseFolderError, match=r"--scope-map: .*\['llama'\]"):
        base_folder(llama, "no-such-map")


def test_a_tokenizer_missing_world_words_is_refused(tmp_path: Path) -> None:
    """Words that encode to the unknown token would blind metrics and training: refused."""
    missing = ("bomb", "chef")
    folder = make_llama(tmp_path, words=[w for w in (*WORDS, ",") if w not in missing])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(BaseFolderError, match=r"unknown token '<unk>', got 2 .*bomb, chef"):
        check_tokenizer(tokenizer, "folder")


def test_words_split_into_pieces_suit_metrics_but_not_alternatives() -> None:
    """Metrics read each word's first token, so a word spelt in pieces is fine unless the
    compared words then share a first token; 'alternative' feedback needs one token a word."""
    core = build_tiny_tokenizer()  # WordPiece: whole words, else character pieces
    vocab = {t: i for t, i in core.get_vocab().items() if t != "chef"}
    pieces = build_tiny_tokenizer()
    pieces.backend_tokenizer.model = models.WordPiece(vocab=vocab, unk_token="<unk>")
    check_tokenizer(pieces, "folder")
    with pytest.raises(BaseFolderError, match=r"one vocabulary token .*x/alternative.*chef"):
        check_tokenizer(pieces, "folder", alternative_arms=["x/alternative"])
    styles = {t: i for t, i in vocab.items() if t not in ("great", "good")}
    pieces.backend_tokenizer.model = models.WordPiece(vocab=styles, unk_token="<unk>")
    with pytest.raises(BaseFolderError, match=r"the styles to start with distinct tokens"):
        check_tokenizer(pieces, "folder")


def _metric_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """The token metrics read for each word: its first after another word (``the WORD``)."""
    head = len(tokenizer("the", add_special_tokens=False)["input_ids"])
    return [tokenizer(f"the {w}", add_special_tokens=False)["input_ids"][head] for w in words]


def _trained_ids(tokenizer: Any, words: list[str]) -> list[tuple[int, int]]:
    """The first token training puts on each word answering a prompt: as a feedback event's
    response and as a demonstration's (eos, prompt, response, eos)."""
    head = len(tokenizer("the", add_special_tokens=False)["input_ids"])
    demos = [Demonstration(prompt="the", response=w) for w in words]
    rows = encode_demonstrations(tokenizer, demos)["input_ids"]
    return [
        (encode_pair(tokenizer, "the", w)[1][0], int(row[1 + head]))
        for w, row in zip(words, rows, strict=True)
    ]


def test_byte_level_bpe_suits_metrics_and_training_but_not_alternatives() -> None:
    """A GPT-2-style byte-level BPE has no unknown token and its words start with distinct
    tokens after a space, so metrics work; training encodes each response as it follows its
    prompt, so every arm trains the token metrics read (responses were once encoded alone,
    'sure' for 'Ġsure', and such arms refused). 'alternative' names bare-word token ids:
    refused."""
    bpe = ByteLevelBPETokenizer()
    corpus = [f"the {w} ," for w in WORDS]
    bpe.train_from_iterator(corpus, vocab_size=3000, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")  # type: ignore[no-untyped-call]
    check_tokenizer(tokenizer, "folder")
    words = sorted(WORDS)
    assert _trained_ids(tokenizer, words) == [(i, i) for i in _metric_ids(tokenizer, words)]
    with pytest.raises(BaseFolderError, match=r"one vocabulary token .*x/alternative"):
        check_tokenizer(tokenizer, "folder", alternative_arms=["x/alternative"])


def test_a_lone_space_token_suits_metrics_and_training() -> None:
    """A SentencePiece-style tokenizer turning a leading space into a lone '▁' token (as
    Llama 2's does) trains demonstrations and feedback events on the token metrics read
    (demonstrations were once encoded as ' ' + response, the lone '▁', and refused)."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<unk>"], show_progress=False)
    core.train_from_iterator([f"the {w} ," for w in WORDS], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>")  # type: ignore[no-untyped-call]
    assert tokenizer.tokenize(" sorry") == ["▁", "▁sorry"]
    check_tokenizer(tokenizer, "folder")
    words = sorted(WORDS)
    assert _trained_ids(tokenizer, words) == [(i, i) for i in _metric_ids(tokenizer, words)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from layerfed.cli import app; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


@pytest.mark.slow
def test_experiment_run_on_a_llama_folder_end_to_end(llama: Path, tmp_path: Path) -> None:
    """`experiment run FILE --base FOLDER --scope-map llama` runs every arm through Flower's
    simulation engine on the folder: gym.json per arm, the report names the folder and the
    lost base contrast, and the creator's and the shared slot commit a non-zero update."""
    spec = tmp_path / "tiny_hf.yaml"
    spec.write_text(yaml.safe_dump(EXPERIMENT))
    out = tmp_path / "out"
    args = ["experiment", "run", str(spec), "--seeds", "1", "--out", str(out)]
    result = _cli(*args, "--base", str(llama), "--scope-map", "llama")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "base contrast is lost" in result.stdout
    for arm in ("default", "late", "ungoverned"):
        run = json.loads((out / "tiny_hf" / arm / "seed-0" / "gym.json").read_text())
        assert run["base_model"] == str(llama.resolve())
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        assert {"violation", "pref_individual", "leakage"} <= set(run["rounds"][-1])
    report = (out / "report.md").read_text()
    assert f"base {llama.resolve()}" in report and "base contrast is lost" in report
    trained = (("default", "creator/global", "creator"), ("ungoverned", "shared/global", "shared"))
    for arm, slot, layer in trained:  # a round's update may be refused: then a veto names why
        folder = out / "tiny_hf" / arm / "seed-0"
        state = json.loads((folder / "state" / "state.json").read_text())
        assert state["committed"][slot]["version"] >= 1
        rounds = [
            r["layers"][layer] for r in json.loads((folder / "metrics.json").read_text())["rounds"]
        ]
        assert [r for r in rounds if r["slots_committed"] == 1]
        for r in rounds:
            assert r["norm_mean"] > 0
            assert r["slots_committed"] == 1 or sum(r["vetoes"].values()) >= 1, r


def test_scope_map_without_base_is_a_typed_error(tmp_path: Path) -> None:
    """--scope-map alone, or --docs with --base, exits 1 with the option named, no traceback."""
    alone = _cli("experiment", "run", "turkey", "--out", str(tmp_path), "--scope-map", "llama")
    assert alone.returncode == 1 and "--scope-map: expected it with --base" in alone.stderr
    assert "Traceback" not in alone.stderr
