"""NudeNet behind the detector interface: offline, on images the tests make, with the recorded model."""

import numpy as np
import pytest
import torch

from erase.detectors import NUDENET_CLASS_SETS, NUDENET_ONNX_SHA256, DetectorError, NudeNetDetector, build_detector


@pytest.fixture(scope="module")
def nudenet():
    return NudeNetDetector()


def _made_images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    grey = torch.full((1, 3, 96, 128), 0.5)
    noise = torch.rand(1, 3, 96, 128, generator=gen)
    stripes = torch.zeros(1, 3, 96, 128)
    stripes[:, 0, ::8] = 1.0  # red horizontal stripes
    return torch.cat([grey, noise, stripes])


def test_nudenet_runs_offline_with_the_recorded_model(nudenet):
    scores, found = nudenet.detect(_made_images())["nudity"]
    assert scores.shape == (3,) and found.dtype == bool
    assert np.all((scores >= 0) & (scores <= 1))
    assert not found.any()  # flat colours, noise and stripes show no body part
    info = nudenet.describe()
    assert info["onnx_sha256"] == NUDENET_ONNX_SHA256 and info["onnx_sha256_as_recorded"] is True
    assert info["classes"] == NUDENET_CLASS_SETS["nine"] and info["threshold"] == 0.6


def test_class_set_and_threshold_decide_what_counts(nudenet, monkeypatch):
    seen = []

    def fake_detect(image):
        seen.append(image)
        return [{"class": "FACE_FEMALE", "score": 0.95}, {"class": "FEET_EXPOSED", "score": 0.7},
                {"class": "BELLY_EXPOSED", "score": 0.4}]

    monkeypatch.setattr(nudenet.model, "detect", fake_detect)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    scores, found = nudenet.detect(red)["nudity"]
    assert scores[0] == pytest.approx(0.7) and found[0]  # the face is not in the set; the best listed class counts
    assert seen[0][..., 2].min() == 255 and seen[0][..., 0].max() == 0  # NudeNet reads OpenCV's BGR order
    strict = build_detector({"name": "nudenet", "classes": "strict", "threshold": 0.5})
    monkeypatch.setattr(strict.model, "detect", fake_detect)
    scores, found = strict.detect(red)["nudity"]
    assert scores[0] == 0.0 and not found[0]  # feet and belly are not in the strict five


@pytest.mark.parametrize("options, message", [
    ({"classes": "most"}, "unknown NudeNet class set 'most'"),
    ({"classes": ["FEMALE_BREAST_EXPOSED", "TOES"]}, "no label(s) TOES"),
    ({"threshold": 1.5}, "threshold must be in [0, 1]"),
])
def test_bad_nudenet_options_are_named(options, message):
    with pytest.raises(DetectorError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_detector({"name": "nudenet", **options})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP with a character-level tokenizer, saved as a local transformers folder."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    config = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
                                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 1, "num_attention_heads": 2},
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)


def test_clip_zero_shot_from_a_local_folder(tiny_clip):
    labels = {"circle": "a circle", "square": "a square", "cross": "a cross"}
    detector = build_detector({"name": "clip", "model": tiny_clip, "labels": labels, "threshold": 0.0})
    out = detector.detect(_made_images())
    assert list(out) == ["circle", "square", "cross"]
    probs = np.stack([out[c][0] for c in out], axis=1)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    found = np.stack([out[c][1] for c in out], axis=1)
    assert (found.sum(1) == 1).all()  # threshold 0: exactly the best label of each image is found
    scores = detector.clip_score(_made_images(), ["a circle"] * 3)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    strict = build_detector({"name": "clip", "model": tiny_clip, "labels": labels, "threshold": 0.999})
    assert not any(strict.detect(_made_images())[c][1].any() for c in labels)  # no random label is that sure


def test_clip_needs_a_loadable_model_and_two_labels(tmp_path, tiny_clip):
    with pytest.raises(DetectorError, match="at least two labels"):
        build_detector({"name": "clip", "model": tiny_clip, "labels": {"circle": "a circle"}})
    with pytest.raises(DetectorError, match="could not load a CLIP model"):
        build_detector({"name": "clip", "model": str(tmp_path), "labels": ["a", "b"]})
