"""Shared fixtures: a tiny seeded Llama with a local chat tokenizer, and the embedded encoder.

Nothing here downloads anything. The tiny generator is random (its text is gibberish) but
deterministic, which is all the contract tests need. Tests marked ``embedded`` load the real
SmolLM2-135M-Instruct instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Pack every decoding-step row count (2-32), not the per-machine calibrated ones, so that the
# packed paths are exercised the same way on every machine; test_packed_linear.py tests calibrate.
os.environ.setdefault("PERSONALIGN_PACKED_LINEAR", "1")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "How do I boil an egg? Put the egg in boiling water for nine minutes.",
    "I am vegetarian and I cook for two. Plan my dinner for tonight please.",
    "Why is the sky blue? Air scatters blue light more than red light.",
    "The quick brown fox jumps over the lazy dog. 1. First step. 2. Second step.",
    "Question Preferred Response Dispreferred Response Task Given the examples above, generate",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(
    vocab_size: int, eos_id: int, pad_id: int, seed: int = 0, max_positions: int = 512, hidden_size: int = 32
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough that greedy output depends on the prompt
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable with ``Personalizer.load(model=...)``."""
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    from personalign.models import load_generator

    return load_generator(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def encoder():
    """The embedded all-MiniLM-L6-v2 (22M parameters, loads in about a second)."""
    from personalign.models import load_encoder

    return load_encoder(device="cpu")


@pytest.fixture()
def pz(tiny_generator, encoder, tmp_path):
    """A Personalizer on the tiny generator with a fresh store; closed after the test."""
    from personalign.personalizer import Personalizer

    with Personalizer(tiny_generator, encoder, store=tmp_path / "store") as personalizer:
        yield personalizer


@pytest.fixture(scope="session")
def smollm():
    """The real embedded generator (converted once into the safetensors cache)."""
    from personalign.models import load_generator

    return load_generator(device="cpu")


@pytest.fixture(scope="session")
def fspo_folder(tiny_model_dir, tmp_path_factory):
    """An FSPO adapter for the tiny model, trained for a few steps on toy users (SFT only)."""
    from personalign.conditioning.fspo import FspoTrainConfig, save_fspo, train_fspo
    from personalign.models import load_generator
    from personalign.training.loop import LoopConfig
    from personalign.types import Comparison

    users = {
        f"u{u}": [
            Comparison(prompt=f"Question {u}-{i} about eggs?", chosen=f"Boil it {i} minutes.", rejected="No.")
            for i in range(6)
        ]
        for u in range(3)
    }
    generator = load_generator(
        str(tiny_model_dir), device="cpu"
    )  # training wraps the model: never the shared fixture
    config = FspoTrainConfig(
        shots=2,
        sft_tasks=4,
        ipo_tasks=0,
        max_length=400,
        sft=LoopConfig(epochs=2, learning_rate=1e-2, batch_size=2),
    )
    model, report = train_fspo(generator, users, config)
    return save_fspo(
        model, tmp_path_factory.mktemp("fspo") / "adapter", generator.model_id, config, report, "test users"
    )


@pytest.fixture(scope="session")
def pplug_folder(tiny_model_dir, encoder, tmp_path_factory):
    """A seeded, untrained Persona-Plug projector for the tiny model and the embedded encoder."""
    from personalign.conditioning.pplug import build_plug, save_plug
    from personalign.models import load_generator

    generator = load_generator(str(tiny_model_dir), device="cpu")
    return save_plug(build_plug(generator, encoder, seed=0), tmp_path_factory.mktemp("pplug") / "projector")


@pytest.fixture(scope="module")
def lively(tiny_generator):
    """The tiny Llama with weights redrawn at std 0.5 (seeded), so greedy output depends on the
    prompt and samples differ from each other."""
    import copy

    import torch

    from personalign.models import Generator

    model = copy.deepcopy(tiny_generator.model)
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=draw) * 0.5)
    return Generator(model=model, tokenizer=tiny_generator.tokenizer, model_id="tiny-lively")


# --- a real server on loopback: a test module defines ``personalizer`` and ``CONFIG`` -----------


@pytest.fixture(scope="module")
def server(request, personalizer):
    """``personalign serve``'s app on loopback for the module's ``personalizer`` and ``CONFIG``."""
    from personalign.server import ServerThread, create_app

    with ServerThread(create_app(personalizer, request.module.CONFIG)) as running:
        yield running


@pytest.fixture()
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture()
def client(server):
    """The official ``openai`` client against the module's server."""
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


# --- preference embedders, fitted once on a small synthetic population -------------------------


@pytest.fixture(scope="session")
def build_embedder():
    """``build(name, featurizer)``: an unfitted embedder of the registry at test size. A new
    embedder needs only its registry line (and, if its defaults are slow, a row here)."""
    from personalign.preference import EMBEDDER_CLASSES
    from personalign.preference.pal import PALConfig
    from personalign.preference.vpl import VPLConfig

    test_size = {
        "pal": (PALConfig(n_prototypes=3),),
        "vpl": (VPLConfig(steps=300, hidden_dim=32, latent_dim=4),),
    }

    def build(name, featurizer):
        return EMBEDDER_CLASSES[name](featurizer, *test_size.get(name, ()))

    return build


@pytest.fixture(scope="session")
def synthetic():
    """``(world, fit, test)``: 60 synthetic users, 30% held out, test prompts unseen in fitting."""
    from personalign.eval.populations import SyntheticConfig, SyntheticPopulation

    config = SyntheticConfig(
        n_users=60, n_types=3, shared_scale=1.0, candidates_per_prompt=5, n_prompts=12, seed=0
    )
    world = SyntheticPopulation(config)
    population = world.population(shots=8, held_out=16, seed=1)
    fit, test = population.split(0.3, seed=0, exclude="pair")
    return world, fit, test


@pytest.fixture(scope="session")
def featurizer(encoder):
    from personalign.preference.base import Featurizer

    return Featurizer(encoder)


@pytest.fixture(scope="session")
def fitted(synthetic, featurizer, build_embedder):
    """Every registered embedder, fitted on the ``synthetic`` fit users."""
    from personalign.preference import EMBEDDER_CLASSES

    _, fit, _ = synthetic
    return {name: build_embedder(name, featurizer).fit(fit.population(), seed=0) for name in EMBEDDER_CLASSES}
