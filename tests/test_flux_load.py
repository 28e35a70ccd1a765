"""The real loading path (FluxPipeline.from_pretrained) on a tiny random pipeline saved to disk."""

import pytest
import torch

from erase.pipelines import ModelError, load_generator
from erase.pipelines.flux import build_random_pipeline


@pytest.mark.slow
def test_load_from_a_local_diffusers_folder(tmp_path, tiny):
    build_random_pipeline("flux-tiny").save_pretrained(tmp_path)
    loaded = load_generator("flux-tiny", str(tmp_path))
    cond_a, cond_b = tiny.encode(["a red cat"]), loaded.encode(["a red cat"])
    torch.testing.assert_close(cond_a.prompt_embeds, cond_b.prompt_embeds)
    x = tiny.noise([1])
    sigma = tiny.sigmas(4)[1]
    with torch.no_grad():
        torch.testing.assert_close(tiny.velocity(x, sigma, cond_a), loaded.velocity(x, sigma, cond_b))
    assert [s.name for s in loaded.mask_sites()] == [s.name for s in tiny.mask_sites()]


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        load_generator("flux.1-schnell", str(tmp_path))


def test_adapter_interface_shapes(tiny):
    cond = tiny.encode(["a cat", "a dog"])
    x = tiny.noise([1, 2])
    assert torch.equal(x[0], tiny.noise([1])[0])  # per-seed noise, independent of the batch
    sigmas = tiny.sigmas(4)
    assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])  # schnell's schedule, no shift
    v = tiny.velocity(x, sigmas[0], cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    images = tiny.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ModelError, match="at least 1"):
        tiny.sigmas(0)
