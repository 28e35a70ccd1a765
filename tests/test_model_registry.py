"""Adding a model is one file and one entry: a third model, defined here, runs `erase train` and `erase eval`.

The model is not FLUX.1: a per-token MLP whose text modulation and hidden units are its two
mask sites, drawing 16x16 images (the toy world's size, so the toy detector can look at them).
Nothing in the project knows it but through its ModelEntry.
"""

import dataclasses
import json

import pytest
import torch
from torch import nn

from erase.cli import main
from erase.masks import load_mask_file
from erase.pipelines import MaskSite, ModelEntry, Tap, mask_sites, models, register
from erase.pipelines.toy import unpack

WIDTH, TEXT, HIDDEN = 12, 8, 32  # a token's channels (2x2 RGB pixels), the text embedding, the MLP's hidden units


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.modulation = nn.Linear(TEXT + 1, 2 * WIDTH)  # shift and scale from the prompt and the noise level
        self.net = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))

    def forward(self, x, sigma, text):
        shift, scale = self.modulation(torch.cat([text, sigma.expand(len(text), 1)], -1)).chunk(2, -1)
        return self.net(x * (1 + scale[:, None]) + shift[:, None])


@dataclasses.dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # (B, 1, TEXT): a prompt's bytes, embedded and averaged
    pooled: torch.Tensor  # (B, TEXT), zero: the attack and the adaptive target read both fields
    BATCHED = ("prompt_embeds", "pooled")  # the fields with a row per prompt


class TokenMLPGenerator:
    model_id, default_steps, guidance = "token-mlp", 2, 1.0

    def __init__(self, device="cpu", dtype=torch.float32):
        torch.manual_seed(0)
        self.transformer, self.embed = TokenMLP().to(device, dtype), nn.Embedding(256, TEXT)
        for module in (self.transformer, self.embed):
            module.requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    def mask_sites(self):
        return token_mlp_sites(self.transformer)

    def encode(self, prompts):
        ids = [torch.tensor(list(p.encode()) or [0]) for p in prompts]
        embeds = torch.stack([self.embed(i).mean(0) for i in ids]).to(self.device, self.dtype)
        return Conditioning(embeds[:, None], torch.zeros_like(embeds))

    def noise(self, seeds):
        return torch.stack([torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def velocity(self, x, sigma, cond):
        return self.transformer(x.to(self.dtype), sigma.reshape(1).to(self.dtype), cond.prompt_embeds[:, 0]).float()

    def decode(self, latents):
        return unpack(latents.float())


def token_mlp_sites(transformer):
    return [MaskSite("norm.modulation", "norm", 2 * WIDTH, (Tap("modulation", "output"),)),
            MaskSite("ffn.net", "ffn", HIDDEN, (Tap("net.2", "input"),), producer="net.0")]


def meta_token_mlp():
    with torch.device("meta"):
        return TokenMLP()


SHAPES = ("circle", "square", "cross")
ENTRY = ModelEntry(
    name="token-mlp", description="a per-token MLP drawing 16x16 shapes (tests)",
    load=lambda model_path, *, dtype, device, guidance: TokenMLPGenerator(device, dtype),
    meta_transformer=meta_token_mlp, mask_sites=token_mlp_sites,
    prompt_sets=lambda concept: ([f"a {concept}", f"a red {concept}"], [f"a {s}" for s in SHAPES if s != concept]),
    eval_sets=lambda concept: {"concept": {s: [f"a {s}", f"a blue {s}"] for s in SHAPES}},
    recipe_defaults=lambda concept: {"beta": 0.5, "sampling_steps": 2},
    detector={"name": "toy"})


@pytest.fixture
def token_mlp():
    register(ENTRY)
    yield ENTRY
    models().pop(ENTRY.name)


def test_a_model_registered_from_a_test_file_trains_and_evaluates(token_mlp, tmp_path, capsys):
    assert [s.name for s in mask_sites("token-mlp")] == ["norm.modulation", "ffn.net"]  # from the meta device
    code = main(["sites", "--model", "token-mlp", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["groups"] == {"norm": {"masks": 1, "entries": 24},
                                                                        "ffn": {"masks": 1, "entries": 32}}
    mask = tmp_path / "circle.safetensors"
    code = main(["train", "--model", "token-mlp", "--concept", "circle", "--steps", "3", "--batch-size", "1",
                 "--out", str(mask), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["config"]["beta"] == 0.5 and metrics["config"]["sampling_steps"] == 2  # the entry's recipe
    assert metrics["steps_done"] == 3 and metrics["sparsity"]["entries"] == 24 + 32
    masks, meta = load_mask_file(str(mask), TokenMLPGenerator().mask_sites(), "token-mlp")
    assert meta["model_id"] == "token-mlp" and meta["concept"] == "circle"
    code = main(["eval", "--model", "token-mlp", "--mask", str(mask), "--json", "--seeds-per-prompt", "2",
                 "--attack-prompts", "1", "--attack-steps", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "token-mlp" and report["concept"] == "circle" and report["detector"]["detector"] == "toy"
    assert report["generations"] == len(SHAPES) * 2 * 2  # the entry's evaluation sets, 2 seeds each
    assert report["erasure_rate"]["n"] == 4 and set(report["detection"]) == set(SHAPES)
    assert report["attack_success_rate"]["n"] == 1 and report["steps"] == 2


def test_a_name_is_registered_once(token_mlp):
    from erase.pipelines import ModelError

    with pytest.raises(ModelError, match="already registered"):
        register(ENTRY)


def test_a_model_loads_in_its_own_dtype_unless_asked_otherwise(monkeypatch):
    from erase.pipelines import load_generator, model

    seen = []
    entry = dataclasses.replace(ENTRY, name="token-mlp-bf16", default_dtype="bf16",
                                load=lambda path, *, dtype, device, guidance: seen.append(dtype))
    monkeypatch.setitem(models(), entry.name, entry)
    load_generator("token-mlp-bf16")
    load_generator("token-mlp-bf16", dtype="fp32")
    assert seen == [torch.bfloat16, torch.float32]
    assert model("flux.1-schnell").default_dtype == model("flux.1-dev").default_dtype == "bf16"
    assert model("flux-tiny").default_dtype == model("toy").default_dtype == "fp32"
