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
