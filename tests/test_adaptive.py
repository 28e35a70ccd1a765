"""The adaptive target (AGE): the Gumbel-softmax mixture, candidate selection, and a run with it."""

import pytest
import torch

from erase.adaptive import AdaptiveConfig, AdaptiveTarget, gumbel_mixture, nearest_concepts, read_vocabulary
from erase.config import TrainConfig
from erase.prompts import PromptError
from erase.train import train


def test_hard_mixture_is_one_hot_forward_with_gradients_to_every_logit():
    logits = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5], requires_grad=True)
    weights = gumbel_mixture(logits, temperature=1.0, hard=True, generator=torch.Generator().manual_seed(0))
    assert sorted(weights.detach().tolist()) == [0.0, 0.0, 0.0, 0.0, 1.0]
    # a loss that depends on every weight: each logit must receive a gradient (straight-through)
    (weights * torch.arange(1.0, 6.0)).sum().backward()
    assert (logits.grad != 0).all(), logits.grad


def test_soft_top_k_keeps_k_weights_and_renormalises():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5], requires_grad=True)
    weights = gumbel_mixture(logits, temperature=0.7, hard=False, top_k=3, generator=torch.Generator().manual_seed(1))
    assert int((weights > 0).sum()) == 3
    assert float(weights.detach().sum()) == pytest.approx(1.0, abs=1e-6)
    soft = gumbel_mixture(logits, temperature=0.7, hard=False, generator=torch.Generator().manual_seed(1))
    kept = weights > 0
    # the kept entries are the k largest soft weights, in the same proportions
    assert set(torch.topk(soft.detach(), 3).indices.tolist()) == set(torch.nonzero(kept).flatten().tolist())
    torch.testing.assert_close(weights[kept], soft[kept] / soft[kept].sum())
    weights[0 if kept[0] else int(torch.nonzero(kept)[0])].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_low_temperature_concentrates_the_soft_mixture():
    logits = torch.tensor([0.0, 0.0, 4.0])
    sharp = gumbel_mixture(logits, 0.05, hard=False, generator=torch.Generator().manual_seed(3))
    flat = gumbel_mixture(logits, 50.0, hard=False, generator=torch.Generator().manual_seed(3))
    assert sharp.max() > 0.99 and flat.max() < 0.5


def test_vocabulary_sources(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# animals\ncat\ndog\ncat\nfox\n")
    assert read_vocabulary(str(words), "flux-tiny", "dog") == ["cat", "fox"]
    assert read_vocabulary("cat, dog ,fox", "flux-tiny", "cat") == ["dog", "fox"]
    assert read_vocabulary(None, "toy", "circle") == ["square", "triangle", "cross", "bar", "hourglass"]  # its group
    assert read_vocabulary(None, "toy", "red") == ["green", "blue", "yellow", "purple"]
    with pytest.raises(PromptError, match="--vocabulary"):
        read_vocabulary(None, "flux-tiny", "cat")
    with pytest.raises(PromptError, match="no concept other than"):
        read_vocabulary("cat", "flux-tiny", "cat")


def test_nearest_concepts_ranks_by_embedding_similarity(tiny):
    ranked = nearest_concepts(tiny, "cat", ["cat", "dog", "car", "a very long unrelated sentence"], k=3)
    assert len(ranked) == 3 and ranked[0][0] == "cat" and ranked[0][1] == pytest.approx(1.0, abs=1e-5)
    assert ranked[0][1] >= ranked[1][1] >= ranked[2][1]


def test_mixture_conditioning_is_the_weighted_sum_of_candidate_encodings(tiny):
    target = AdaptiveTarget(tiny, "cat", "flux-tiny", AdaptiveConfig(k=2, vocabulary="dog,fox"))
    words = [w for w, _ in target.candidates]
    weights = torch.tensor([0.25, 0.75])
    cond = target.conditioning(["a photo of a cat"], weights)
    first, second = (tiny.encode([f"a photo of a {w}"]) for w in words)
    torch.testing.assert_close(cond.prompt_embeds, 0.25 * first.prompt_embeds + 0.75 * second.prompt_embeds)
    torch.testing.assert_close(cond.pooled, 0.25 * first.pooled + 0.75 * second.pooled)


def test_adaptive_run_learns_target_logits_and_reports_them(tiny):
    cfg = TrainConfig(concept="cat", target="adaptive", vocabulary="dog,fox,car", adaptive_k=3, adaptive_lr=0.1,
                      steps=4, batch_size=1, log_every=2)
    result = train(tiny, cfg, ["a photo of a cat"], ["a bowl of fruit"], progress=False)
    assert len(result.learnt_target) == 3
    assert sum(t["weight"] for t in result.learnt_target) == pytest.approx(1.0, abs=1e-3)
    assert len({t["weight"] for t in result.learnt_target}) > 1, "the target logits never moved"
    assert "target_preserve_loss" in result.history[-1]


def test_adaptive_needs_the_concept_in_each_prompt(tiny):
    cfg = TrainConfig(concept="cat", target="adaptive", vocabulary="dog", steps=1, batch_size=1)
    with pytest.raises(PromptError, match="contains none of"):
        train(tiny, cfg, ["a photo of a dog"], ["a bowl of fruit"], progress=False)


def test_adaptive_step_is_the_same_with_and_without_checkpointing(tiny):
    """The min-max step (π's ascent gradient and the masks' descent) through checkpointed steps equals plain backprop."""
    outcomes = []
    for checkpointing in (False, True):
        cfg = TrainConfig(concept="cat", target="adaptive", vocabulary="dog,fox", adaptive_k=2, adaptive_lr=0.5,
                          steps=1, batch_size=2, log_every=1, checkpointing=checkpointing, sampling_steps=3,
                          parametrisation="sigmoid", init_logit=0.5)
        states = []
        train(tiny, cfg, ["a photo of a cat"], ["a bowl of fruit"], progress=False,
              on_log=lambda row, state: states.append(state.resume_point()))
        outcomes.append(states[-1])
    plain, ckpt = outcomes

    def first_moments(optimizer_state):  # Adam's exp_avg after one step is 0.1 x the gradient
        return torch.cat([s["exp_avg"].flatten() for _, s in sorted(optimizer_state["state"].items())])

    pi_plain, pi_ckpt = first_moments(plain["adaptive"]["optimizer"]), first_moments(ckpt["adaptive"]["optimizer"])
    assert pi_plain.abs().sum() > 0, "no gradient reached π: the check would be vacuous"
    assert ((pi_ckpt - pi_plain).norm() / pi_plain.norm()) < 1e-5
    masks_plain, masks_ckpt = first_moments(plain["optimizer"]), first_moments(ckpt["optimizer"])
    assert masks_plain.abs().sum() > 0
    assert ((masks_ckpt - masks_plain).norm() / masks_plain.norm()) < 1e-5


def test_the_candidates_replace_every_phrasing_of_a_toy_concept():
    from erase.adaptive import concept_phrasings, names_concept
    from erase.prompts import substitute

    phrases = concept_phrasings("toy", "cross")
    assert phrases[0] == "cross" and {"plus sign", "plus", "shape like a first-aid sign"} <= set(phrases)
    # longest first: "a plus sign" becomes "a square", not "a square sign"
    assert substitute("a red plus sign", dict.fromkeys(phrases, "square")) == "a red square"
    assert names_concept("a shape of two crossing beams", phrases) and not names_concept("a red shape", phrases)
    assert concept_phrasings("flux.1-schnell", "nudity") == ["nudity"]  # an open vocabulary: the words given
    assert concept_phrasings("a model outside the registry", "cross") == ["cross"]


def test_a_toy_object_trains_on_its_synonyms_and_descriptions_too(capsys):
    from erase.pipelines import load_generator

    gen = load_generator("toy")
    cfg = TrainConfig(concept="cross", target="adaptive", adaptive_k=2, steps=1, batch_size=2, log_every=1)
    prompts = ["a red plus sign", "a shape of two crossing beams", "a red cross", "a red circle"]
    train(gen, cfg, prompts, ["a blue square"], progress=False)
    # the one prompt that names no phrasing of the cross is left out, the other three train
    assert "training on the 3 of 4 concept rows" in capsys.readouterr().err
