"""The MCE recipe on the tiny random FLUX.1 config."""

import pytest
import torch

from erase.config import ConfigError, TrainConfig
from erase.prompts import PromptError, parse_substitutions, substitute
from erase.train import TrainingStopped, train

CAT = ["a photo of a cat", "a cat on a sofa"]
NEUTRAL = ["a bowl of fruit", "a red car"]


def test_training_lowers_the_erase_loss_and_removes_units(tiny):
    cfg = TrainConfig(concept="cat", steps=20, batch_size=2, log_every=5)
    result = train(tiny, cfg, CAT, NEUTRAL, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["erase_loss"] < 0.85 * first["erase_loss"]
    assert last["sparsity"] > 0
    assert result.status == "finished" and result.steps_done == 20
    for lam in result.masks.logits.values():
        assert lam.dtype == torch.float32
    # lr_attn is 0 by default: attention heads get no masks at all
    assert {s.group for s in result.masks.sites} == {"ffn", "norm"}


@pytest.mark.slow
def test_sparsity_penalty_keeps_more_units(tiny):
    base = TrainConfig(concept="cat", steps=20, batch_size=2, log_every=20)
    free = train(tiny, base, CAT, NEUTRAL, progress=False).history[-1]["sparsity"]
    penalised = TrainConfig(concept="cat", steps=20, batch_size=2, log_every=20, sparsity_weight=50.0)
    kept = train(tiny, penalised, CAT, NEUTRAL, progress=False).history[-1]["sparsity"]
    assert free > 0 and kept < free


def test_non_finite_loss_stops_and_keeps_the_last_good_masks(tiny, velocity_turns_nan):
    velocity_turns_nan(type(tiny), after=60)
    cfg = TrainConfig(concept="cat", steps=50, batch_size=2, log_every=1)
    with pytest.raises(TrainingStopped, match="non-finite loss") as err:
        train(tiny, cfg, CAT, NEUTRAL, progress=False)
    result = err.value.result
    assert 0 < result.steps_done < 50
    assert result.masks.is_finite()
    assert len(result.history) == result.steps_done


def test_targets_and_encodings_are_computed_once_per_prompt_and_noise(tiny, monkeypatch):
    encoded, velocities = [], []
    encode, velocity = type(tiny).encode, type(tiny).velocity

    def counting_encode(self, prompts):
        encoded.append(tuple(prompts))
        return encode(self, prompts)

    def counting_velocity(self, x, sigma, cond):
        velocities.append(torch.is_grad_enabled())  # without gradients: only the targets
        return velocity(self, x, sigma, cond)

    monkeypatch.setattr(type(tiny), "encode", counting_encode)
    monkeypatch.setattr(type(tiny), "velocity", counting_velocity)
    cfg = TrainConfig(concept="cat", steps=4, batch_size=1, target="substitute", substitutions={"cat": "dog"})
    train(tiny, cfg, CAT[:1], NEUTRAL[:1], progress=False)
    # every prompt through the text encoders once: the concept's, the neutral one, the target's
    assert sorted(p for batch in encoded for p in batch) == ["a bowl of fruit", "a photo of a cat", "a photo of a dog"]
    # two targets (the substituted prompt's and the neutral one's), each sampled once over 4 steps
    assert velocities.count(False) == 2 * tiny.default_steps


@pytest.mark.parametrize("change, error, match", [
    (dict(steps=0), ConfigError, "steps must be at least 1"),
    (dict(target="substitute"), ConfigError, "--substitute OLD=NEW"),
    (dict(lr_ffn=0.0, lr_norm=0.0), ConfigError, "learning rate 0"),
    (dict(target_sparsity=1.5), ConfigError, "target sparsity"),
    (dict(optimizer="sgd"), ConfigError, "unknown optimizer"),
    (dict(sites=("ffn", "mlp")), ConfigError, "site group 'mlp' does not exist"),
])
def test_bad_settings_are_clear_errors(tiny, change, error, match):
    cfg = TrainConfig(concept="cat", **{"steps": 2, **change})
    with pytest.raises(error, match=match):
        train(tiny, cfg, CAT, NEUTRAL, progress=False)


def test_empty_prompt_lists_are_clear_errors(tiny):
    cfg = TrainConfig(concept="cat", steps=2)
    with pytest.raises(PromptError, match="erase prompt list is empty"):
        train(tiny, cfg, [], NEUTRAL, progress=False)
    with pytest.raises(PromptError, match="neutral"):
        train(tiny, cfg, CAT, [], progress=False)


def test_substitution_map():
    mapping = parse_substitutions(["nude man=a man", "nude=clothed"])
    assert substitute("a nude man on a beach", mapping) == "a a man on a beach"
    assert substitute("nude painting", mapping) == "clothed painting"
    # whole words only: the toy bar's synonym "strip" is inside "striped", which must stay
    assert substitute("a striped red strip", {"strip": "shape"}) == "a striped red shape"
    assert substitute("a striped red strip", {"strip": "sq\\1are"}) == "a striped red sq\\1are"  # taken literally
    with pytest.raises(PromptError, match="contains none of"):
        substitute("a striped circle", {"strip": "shape"})
    assert substitute("a red circle", {"red ": ""}) == "a circle"  # a key with its own edge
    with pytest.raises(PromptError, match="contains none of"):
        substitute("a landscape", mapping)
    with pytest.raises(PromptError, match="OLD=NEW"):
        parse_substitutions(["no equals sign"])


def test_text_encoders_leave_the_device_once_every_prompt_is_encoded(tiny, monkeypatch):
    events = []
    encode, velocity, move = type(tiny).encode, type(tiny).velocity, type(tiny).text_encoders_to

    def recording_encode(self, prompts):
        events.append("encode")
        return encode(self, prompts)

    def recording_velocity(self, x, sigma, cond):
        events.append("velocity")
        return velocity(self, x, sigma, cond)

    def recording_move(self, device):
        events.append(f"encoders to {device}")
        return move(self, device)

    monkeypatch.setattr(type(tiny), "encode", recording_encode)
    monkeypatch.setattr(type(tiny), "velocity", recording_velocity)
    monkeypatch.setattr(type(tiny), "text_encoders_to", recording_move)
    cfg = TrainConfig(concept="cat", steps=3, batch_size=2, target="substitute", substitutions={"cat": "dog"})
    train(tiny, cfg, CAT, NEUTRAL, progress=False)
    moves = [i for i, e in enumerate(events) if e.startswith("encoders to")]
    assert [events[i] for i in moves] == ["encoders to cpu", f"encoders to {tiny.device}"]
    off, back = moves
    assert "encode" in events[:off] and "encode" not in events[off:]  # all encoding done before they left
    assert "velocity" not in events[:off] and "velocity" in events[off:back] and back == len(events) - 1


def test_a_shared_starting_noise_gives_every_sample_of_both_terms_one_seed():
    from erase.train import first_seeds, prompt_rows

    cfg = TrainConfig(concept="cat", shared_noise=True, seed=3)
    erase_first, neutral_first = first_seeds(cfg)
    rows = prompt_rows(CAT, erase_first, 1, True) + prompt_rows(NEUTRAL, neutral_first, 1, True)
    assert len(rows) == len(CAT) + len(NEUTRAL) and len({r["seed"] for r in rows}) == 1
    apart = prompt_rows(CAT, erase_first, 1) + prompt_rows(NEUTRAL, first_seeds(TrainConfig(concept="cat"))[1], 1)
    assert len({r["seed"] for r in apart}) == len(apart)  # without it, a noise per prompt


def test_the_text_length_reaches_the_t5_encoding(tiny, monkeypatch):
    from erase.train import EncodingCache

    assert EncodingCache(tiny, 7)(["a photo of a cat"]).prompt_embeds.shape[1] == 7
    assert EncodingCache(tiny)(["a photo of a cat"]).prompt_embeds.shape[1] == tiny.max_text
    from erase.pipelines import ModelError, load_generator

    with pytest.raises(ModelError, match="drop text_length"):
        load_generator("toy").encode(["a circle"], text_length=7)
