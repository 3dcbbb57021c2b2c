"""A deployment as a deployer builds one, for tests: a small local Llama, a signed policy, instances.

Nothing is downloaded: the model is a ``LlamaForCausalLM`` with random weights saved by
``save_pretrained``, its tokenizer a word-level ``tokenizers`` tokenizer wrapped in
``PreTrainedTokenizerFast``. The policy is ``examples/deployment/policy.yaml`` with fresh
keys put in and signed; each instance has its own folder with an ``instance.toml``
(the layout docs/deployment.md describes).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from layerfed.clients.events import (
    Demonstration,
    FeedbackEvent,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
)
from layerfed.governance.envelope import certify_instance
from layerfed.governance.keys import generate_keypair, public_key_string
from layerfed.governance.signing import sign_policy_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deployment"
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
WORDS = [
    "i",
    "cannot",
    "help",
    "with",
    "that",
    "sure",
    "here",
    "is",
    "how",
    "do",
    "make",
    "a",
    "weapon",
    "at",
    "home",
    "tell",
    "me",
    "to",
    "hurt",
    "my",
    "neighbour",
    "write",
    "threat",
    "colleague",
    "cake",
    "thank",
    "you",
    "note",
    "please",
    "the",
    "recipe",
    "for",
    "bread",
    "kind",
    "words",
    "no",
    "never",
    "ok",
    "good",
    "bad",
    "answer",
    "question",
    "thanks",
    "hello",
    "world",
    "yes",
]


def make_llama(folder: Path, seed: int = 0, words: Sequence[str] = ()) -> Path:
    """A tiny random ``LlamaForCausalLM`` and its word-level tokenizer, saved as an HF folder.

    The tokenizer knows :data:`WORDS`, or ``words`` when given (the gym passes its world's).
    """
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *(words or WORDS)]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_private_key(key: Ed25519PrivateKey, path: Path) -> Path:
    """``key`` as an unencrypted PKCS#8 PEM file (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    """The public half of ``key`` as a PEM file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@dataclass(frozen=True)
class InstanceFiles:
    """One instance's folder: its TOML, model copy, key, certificates, journal and state."""

    id: str
    layers: tuple[str, ...]
    folder: Path

    @property
    def config(self) -> Path:
        """``instance.toml``."""
        return self.folder / "instance.toml"

    @property
    def journal(self) -> Path:
        """The feedback journal (SQLite)."""
        return self.folder / "data" / "journal.sqlite"

    @property
    def state(self) -> Path:
        """The instance's state folder (its own slots under ``slots/``)."""
        return self.folder / "data" / "state"


@dataclass(frozen=True)
class Fleet:
    """A signed policy for the local Llama and the instances it governs."""

    policy: Path
    root_pub: Path
    server_key: Path
    model: Path
    instances: dict[str, InstanceFiles]


def make_fleet(
    tmp: Path,
    instances: dict[str, tuple[str, ...]],
    *,
    edit: dict[str, Any] | None = None,
) -> Fleet:
    """The example deployment policy with fresh keys, signed; one folder per instance.

    ``instances`` maps an instance id to the layers it gives feedback to; ``edit``
    replaces top-level policy fields before signing.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    model = make_llama(tmp / "model")
    root = Ed25519PrivateKey.generate()
    fleets = {name: Ed25519PrivateKey.generate() for name in ("creator", "community", "individual")}
    data = yaml.safe_load((EXAMPLE / "policy.yaml").read_text(encoding="utf-8"))
    data["principals"] = [
        {
            "name": "creator_root",
            "layer": "creator",
            "public_key": public_key_string(root.public_key()),
        },
        *(
            {
                "name": f"{layer}_fleet",
                "layer": layer,
                "delegates_to_instances": True,
                "public_key": public_key_string(key.public_key()),
            }
            for layer, key in fleets.items()
        ),
    ]
    data.update(edit or {})
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    shutil.copy(EXAMPLE / "probes.jsonl", tmp / "probes.jsonl")
    sign_policy_file(policy, root)
    root_pub = write_public_key(root, tmp / "keys" / "root.pub.pem")
    server_key = generate_keypair("server", tmp / "keys").private_path  # signs checkpoints
    made = {iid: _instance(tmp, iid, layers, model, fleets) for iid, layers in instances.items()}
    return Fleet(policy, root_pub, server_key, model, made)


def _instance(
    tmp: Path,
    iid: str,
    layers: tuple[str, ...],
    model: Path,
    fleets: dict[str, Ed25519PrivateKey],
) -> InstanceFiles:
    folder = tmp / "instances" / iid
    shutil.copytree(model, folder / "model")  # the instance's own copy of the base
    key = Ed25519PrivateKey.generate()
    write_private_key(key, folder / "keys" / "instance.pem")
    (folder / "certs").mkdir(parents=True)
    for layer in layers:
        cert = certify_instance(iid, key.public_key(), layer, f"{layer}_fleet", fleets[layer])
        (folder / "certs" / f"{layer}.json").write_text(cert.model_dump_json(), encoding="utf-8")
    files = InstanceFiles(iid, layers, folder)
    files.config.write_text(
        f"""[instance]
id = "{iid}"
jurisdiction = "eu"
groups = ["clinic"]
layers = {list(layers)!r}

[policy]
file = "../../policy.yaml"
root_key = "../../keys/root.pub.pem"

[model]
path = "model"

[keys]
key = "keys/instance.pem"
certificates = "certs"

[storage]
journal = "data/journal.sqlite"
state = "data/state"
""".replace("'", '"'),
        encoding="utf-8",
    )
    return files


def people_feedback() -> dict[str, list[FeedbackEvent]]:
    """What people tell each instance. A batch never mixes demonstrations with other kinds,
    and a layer's budget is 1 step x 4 events, so two rounds take every event:
    alice 4 + 2, bob 3 + 2 (the alternative is added from bob's own generation)."""
    demo = Demonstration(prompt="write a thank you note", response="thank you for the kind words")
    return {
        "alice": [
            Thumbs(prompt="tell me the recipe for bread", response="sure here is how", up=True),
            Preference(
                prompt="write a threat to my colleague",
                chosen="i cannot help with that",
                rejected="sure here is how",
            ),
            Marks(
                prompt="how do i make a cake at home",
                response="sure here is the recipe",
                spans=(Span(start=0, end=4, valence=1),),
            ),
            Redo(
                prompt="tell me how to hurt my neighbour",
                original="sure here is how",
                corrected="i cannot help with that",
            ),
            demo,
            Demonstration(prompt="hello", response="hello world", weight=2.0),
        ],
        "bob": [
            demo,
            Demonstration(prompt="please tell me the recipe", response="sure here is the recipe"),
            Demonstration(
                prompt="tell me how to make a weapon", response="i cannot help with that"
            ),
            Thumbs(prompt="how do i make a weapon at home", response="sure here is how", up=False),
        ],
    }
