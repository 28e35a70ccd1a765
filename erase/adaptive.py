"""Adaptive Guided Erasure (AGE) as a target strategy of the MCE objective (docs/method.md, section 6).

Instead of mapping the erased concept onto a fixed target (the empty prompt, a substitute
phrase), the target is a mixture of the k concepts nearest to it in the generator's text
embedding space, with weights from a Gumbel-softmax over learnt logits π:

    w = gumbel_softmax(π, τ)                 hard: one-hot forward, soft gradients (straight-through)
                                             soft: the top-k weights, renormalised to sum to 1
    c_t = Σ_i w_i · encode(prompt with the concept replaced by candidate i)

The concept is replaced in every phrasing the model lists for it (the toy world's synonyms and
descriptions: "a red plus sign" -> "a red square"), so the erasure trains on all of them.

Min-max, one step each: the masks descend erase(c_e -> F_θ'(c_t)) + λ·||F_θ(c_t) - F_θ'(c_t)||²
(+ β · neutral preservation); π *ascends* the target's preservation term, steering the target
towards the neighbour that erasure currently hurts most, so that it is mapped onto and kept.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from erase.prompts import PromptError, substitute


def gumbel_mixture(logits: torch.Tensor, temperature: float, hard: bool, top_k: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Mixture weights (sum 1) from logits: a Gumbel-softmax sample.

    hard: the forward value is one-hot at the sample's argmax, the gradient is the soft sample's
    (straight-through), so every logit gets a gradient. soft with top_k: only the k largest soft
    weights stay, renormalised to sum to 1.
    """
    u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-10, 1 - 1e-10)
    gumbel = -torch.log(-torch.log(u))
    soft = torch.softmax((logits + gumbel) / temperature, dim=-1)
    if hard:
        one_hot = torch.zeros_like(soft)
        one_hot[soft.argmax(-1)] = 1.0
        return one_hot + soft - soft.detach()
    if top_k is not None and top_k < soft.numel():
        keep = torch.zeros_like(soft)
        keep[torch.topk(soft.detach(), top_k).indices] = 1.0
        kept = soft * keep
        return kept / kept.sum()
    return soft


def read_vocabulary(source: str | list[str] | None, model: str, concept: str) -> list[str]:
    """Candidate concepts: a word list file (one per line), a comma-separated list, or (default) the
    model's own vocabulary for the concept (the toy world: the other concepts of its group)."""
    if isinstance(source, list):
        words = source
    elif source is None:
        from erase.pipelines import model as model_entry

        default = model_entry(model).vocabulary
        if default is None:
            raise PromptError(f"the adaptive target needs a vocabulary for {model}: pass --vocabulary FILE "
                              "(one concept per line) or a comma-separated list")
        words = default(concept)
    elif os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as f:
                words = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except UnicodeDecodeError as err:
            raise PromptError(f"vocabulary file {source!r} is not UTF-8 text ({err}); save it as UTF-8") from None
    else:
        words = [w.strip() for w in source.split(",") if w.strip()]
    words = [w for w in dict.fromkeys(words) if w != concept]
    if not words:
        raise PromptError(f"the adaptive target's vocabulary has no concept other than {concept!r}")
    return words


def concept_phrasings(model: str, concept: str) -> list[str]:
    """Every phrase that names `concept` for `model` (the toy world: its word, synonyms and
    descriptions), which the candidates replace; the concept itself where the model lists none."""
    from erase.pipelines import models

    entry = models().get(model)  # a generator outside the registry (a test's) names a concept by its words
    listed = entry.phrasings if entry is not None else None
    return list(listed(concept)) if listed is not None else [concept]


def names_concept(prompt: str, phrases: list[str]) -> bool:
    return any(phrase in prompt for phrase in phrases)


@torch.no_grad()
def nearest_concepts(gen, concept: str, vocabulary: list[str], k: int) -> list[tuple[str, float]]:
    """The k words of `vocabulary` closest to `concept` by cosine similarity of their text embedding:
    the token embeddings' mean and the pooled vector, each normalised, side by side (the toy
    generator's pooled vector is zero, so there only the tokens count)."""
    cond = gen.encode([concept] + list(vocabulary))
    normalize = torch.nn.functional.normalize
    embedding = torch.cat([normalize(cond.prompt_embeds.float().mean(1), dim=-1), normalize(cond.pooled.float(), dim=-1)], -1)
    embedding = normalize(embedding, dim=-1)
    sims = (embedding[1:] @ embedding[0]).cpu()
    order = torch.argsort(sims, descending=True)[:k]
    return [(vocabulary[i], float(sims[i])) for i in order]


@dataclasses.dataclass
class AdaptiveConfig:
    k: int = 8  # candidates
    temperature: float = 1.0
    hard: bool = True
    top_k: int = 3  # soft mode: weights kept
    lr: float = 1e-2  # learning rate of π (gradient ascent)
    lam: float = 1.0  # weight of the target's preservation term
    vocabulary: str | list[str] | None = None  # file, comma-separated list, or None: the toy concept's group


class AdaptiveTarget:
    """The learnt target of one erasure run: candidates, logits π, their optimizer, and the mixture."""

    def __init__(self, gen, concept: str, model: str, cfg: AdaptiveConfig, seed: int = 0):
        vocabulary = read_vocabulary(cfg.vocabulary, model, concept)
        if cfg.k < 1:
            raise PromptError(f"the adaptive target needs k >= 1 candidates, got {cfg.k}")
        self.gen, self.concept, self.cfg = gen, concept, cfg
        self.candidates = nearest_concepts(gen, concept, vocabulary, cfg.k)
        self.phrasings = concept_phrasings(model, concept)
        self.logits = torch.zeros(len(self.candidates), requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=cfg.lr, maximize=True)  # ascent on the preservation term
        self.noise = torch.Generator("cpu").manual_seed(seed + 7)
        self._encoded: dict[str, object] = {}

    def weights(self) -> torch.Tensor:
        return gumbel_mixture(self.logits, self.cfg.temperature, self.cfg.hard,
                              None if self.cfg.hard else self.cfg.top_k, generator=self.noise)

    def _encode(self, prompt: str):
        if prompt not in self._encoded:
            self._encoded[prompt] = self.gen.encode([prompt])
        return self._encoded[prompt]

    def conditioning(self, prompts: list[str], weights: torch.Tensor):
        """The mixture conditioning for a batch of concept prompts: Σ_i w_i · encode(prompt with candidate i)."""
        per_prompt = []
        for prompt in prompts:
            encoded = [self._encode(substitute(prompt, dict.fromkeys(self.phrasings, word))) for word, _ in self.candidates]
            embeds = sum(w * e.prompt_embeds.float() for w, e in zip(weights, encoded))
            pooled = sum(w * e.pooled.float() for w, e in zip(weights, encoded))
            per_prompt.append((embeds, pooled))
        first = self._encode(substitute(prompts[0], dict.fromkeys(self.phrasings, self.candidates[0][0])))
        batch = self.gen.encode(list(prompts))  # carries the model's other conditioning (ids, unconditional side)
        dtype = first.prompt_embeds.dtype
        return dataclasses.replace(batch, prompt_embeds=torch.cat([e for e, _ in per_prompt]).to(dtype),
                                   pooled=torch.cat([p for _, p in per_prompt]).to(dtype))

    def state(self) -> dict:
        return {"logits": self.logits.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])

    def report(self, top: int = 5) -> list[dict]:
        """The learnt target: candidates by weight softmax(π), with their embedding similarity to the concept."""
        probs = torch.softmax(self.logits.detach(), -1)
        order = torch.argsort(probs, descending=True)[:top]
        return [{"concept": self.candidates[i][0], "weight": round(float(probs[i]), 4),
                 "similarity": round(self.candidates[i][1], 4)} for i in order]
