"""personalign as a guest in a Hugging Face process: no global side effects, transformers' load options.

Offline mode is scoped to personalign's own loads (``local_files_only``): the host's
environment and ``huggingface_hub.constants.HF_HUB_OFFLINE`` stay as they were, and nothing
touches the network unless ``local_files_only=False`` is passed.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from personalign.errors import ModelNotFoundError, ValidationError
from personalign.models import Generator, hub_id, load_encoder, load_generator, weights_fingerprint

HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture()
def online_host(monkeypatch):
    """A host process that is online as far as Hugging Face knows, with the network cut underneath."""
    import huggingface_hub.constants as hf_constants

    for name in HUB_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"personalign tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return hf_constants


def _hub_state(hf_constants):
    return dict(os.environ), hf_constants.HF_HUB_OFFLINE


def test_loading_models_leaves_the_host_process_alone(online_host, tiny_model_dir, tmp_path):
    # Third-party imports set variables once, when first imported: scikit-learn (under
    # sentence-transformers) KMP_*, torch._dynamo (under transformers) TORCHINDUCTOR_CACHE_DIR.
    # They are imported before the snapshot; what is checked is what loading does.
    import sentence_transformers  # noqa: F401
    import torch._dynamo  # noqa: F401

    from personalign.personalizer import Personalizer

    before = _hub_state(online_host)
    load_generator(str(tiny_model_dir), device="cpu")
    load_encoder(device="cpu")
    assert _hub_state(online_host) == before
    with Personalizer.load(model=str(tiny_model_dir), device="cpu", store=tmp_path / "store"):
        assert _hub_state(online_host) == before
    assert _hub_state(online_host) == before
    assert before[1] is False and not any(name in before[0] for name in HUB_VARS)


def test_an_uncached_hub_id_fails_without_touching_the_network(online_host):
    # local_files_only=True is the default: the cache is asked, the Hub is not (the socket would raise).
    with pytest.raises(ModelNotFoundError, match="local_files_only=False"):
        load_generator("personalign-tests/no-such-model", device="cpu")
    with pytest.raises(ModelNotFoundError, match="local_files_only=False"):
        load_encoder("personalign-tests/no-such-encoder", device="cpu")


class _Spy:
    """Records the keyword arguments of ``from_pretrained`` and calls through."""

    def __init__(self, monkeypatch, cls):
        self.calls = []
        original = cls.from_pretrained

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return original(*args, **{k: v for k, v in kwargs.items() if k != "quantization_config"})

        monkeypatch.setattr(cls, "from_pretrained", spy)


def test_load_options_reach_transformers(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, tokenizers = _Spy(monkeypatch, AutoModelForCausalLM), _Spy(monkeypatch, AutoTokenizer)
    quantization = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
    }  # recorded, not applied (no GPU here)
    generator = load_generator(
        str(tiny_model_dir), torch_dtype=torch.bfloat16, device_map="cpu", quantization_config=quantization,
        attn_implementation="eager", revision="main",
    )  # fmt: skip
    [kwargs] = models.calls
    assert kwargs["device_map"] == "cpu" and kwargs["quantization_config"] is quantization
    assert kwargs["attn_implementation"] == "eager" and kwargs["revision"] == "main"
    assert (
        kwargs["dtype"] is torch.bfloat16
        and kwargs["trust_remote_code"] is False
        and kwargs["local_files_only"] is True
    )
    [tok_kwargs] = tokenizers.calls
    assert tok_kwargs == {"revision": "main", "trust_remote_code": False, "local_files_only": True}
    assert generator.model.dtype == torch.bfloat16 and generator.model.config._attn_implementation == "eager"
    assert {p.device.type for p in generator.model.parameters()} == {"cpu"} and generator.revision == "main"


def test_defaults_pass_only_the_safe_options(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    models = _Spy(monkeypatch, AutoModelForCausalLM)
    load_generator(str(tiny_model_dir), device="cpu", local_files_only=False, trust_remote_code=True)
    [kwargs] = models.calls
    assert kwargs["trust_remote_code"] is True and kwargs["local_files_only"] is False
    assert not {"device_map", "quantization_config", "attn_implementation"} & set(
        kwargs
    )  # transformers' own defaults


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, "torch_dtype"),
        ({"device": "cpu", "device_map": "auto"}, "device"),
        ({"torch_dtype": torch.int8}, "dtype"),
    ],
)
def test_contradictory_load_options_are_refused(tiny_model_dir, kwargs, field):
    with pytest.raises(ValidationError) as info:
        load_generator(str(tiny_model_dir), **kwargs)
    assert info.value.field == field and info.value.fix


def test_weights_fingerprint_identifies_the_base_weights(tiny_generator, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    fingerprint = tiny_generator.fingerprint()
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 16
    again = load_generator(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert (
        weights_fingerprint(again.model) == fingerprint
    )  # float32 and bfloat16 loads of one checkpoint agree
    wrapped = get_peft_model(again.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert weights_fingerprint(wrapped) == fingerprint  # adapters attached: the same base
    with torch.no_grad():
        next(
            p for n, p in wrapped.get_base_model().named_parameters() if "lora_" not in n and p.dim() == 2
        ).add_(0.5)
    assert weights_fingerprint(wrapped) != fingerprint


def test_embedded_pseudo_id_names_its_hub_model(tiny_generator):
    assert hub_id("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("some/model") == "some/model"
    generator = Generator(
        model=tiny_generator.model,
        tokenizer=tiny_generator.tokenizer,
        model_id="embedded:smollm2-135m-instruct",
    )
    assert generator.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_personalizer_load_passes_the_load_options_through(monkeypatch, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import personalign.personalizer as personalizer_module

    models, tokenizers = _Spy(monkeypatch, AutoModelForCausalLM), _Spy(monkeypatch, AutoTokenizer)
    encoder_calls = []
    real_load_encoder = personalizer_module.load_encoder

    def spy_encoder(*args, **kwargs):
        encoder_calls.append(kwargs)
        return real_load_encoder(*args, **kwargs)

    monkeypatch.setattr(personalizer_module, "load_encoder", spy_encoder)
    options = {
        "torch_dtype": torch.bfloat16,
        "device_map": "cpu",
        "attn_implementation": "eager",
        "revision": "main",
    }
    with personalizer_module.Personalizer.load(
        model=str(tiny_model_dir), store=tmp_path / "store", **options
    ) as pz:
        assert pz.generator.model.dtype == torch.bfloat16 and pz.generator.revision == "main"
    [kwargs] = models.calls
    assert (
        kwargs["device_map"] == "cpu"
        and kwargs["attn_implementation"] == "eager"
        and kwargs["revision"] == "main"
    )
    assert (
        kwargs["dtype"] is torch.bfloat16
        and kwargs["trust_remote_code"] is False
        and kwargs["local_files_only"] is True
    )
    assert tokenizers.calls[0] == {
        "revision": "main",
        "trust_remote_code": False,
        "local_files_only": True,
    }  # then the encoder's
    assert encoder_calls == [
        {"device": None, "trust_remote_code": False, "local_files_only": True}
    ]  # the revision is the generator's


def test_local_loads_draw_no_loading_bars_and_restore_the_setting(capfd, tiny_model_dir):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.enable_progress_bar()
    try:
        load_generator(str(tiny_model_dir), device="cpu")
        load_encoder(device="cpu")
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
        disable_progress_bars()  # the host hid the hub's bars only: that choice is kept
        load_generator(str(tiny_model_dir), device="cpu")
        assert hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        hf_logging.disable_progress_bar()  # the host hid every bar: still hidden afterwards
        load_generator(str(tiny_model_dir), device="cpu")
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar() if before[0] else hf_logging.disable_progress_bar()
        disable_progress_bars() if before[1] else enable_progress_bars()
