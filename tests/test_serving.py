"""erase.apply_masks, the Python API for serving code: the README's example runs, and it gives the
images `erase masks apply` gives; on a FLUX pipeline loaded with diffusers' own from_pretrained (bf16)
it folds exactly what the command folds; dropped neurons match the folded model; a changed
registry artifact is refused."""

import pathlib
import re

import numpy as np
import pytest
import torch
from conftest import log_mask_run
from PIL import Image

import erase
from erase.cli import main
from erase.detectors import to_uint8
from erase.evaluate import generate, save_image_grid
from erase.masks import fold_into_weights
from erase.pipelines import load_generator, mask_sites
from erase.registry import RegistryError, load_masks

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The Python block after <!-- api-example --> in the README."""
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "the README has no API example (a ```python block after <!-- api-example -->)"
    return match.group(1)


@pytest.fixture
def registry_with_toy_striped(tmp_path, monkeypatch):
    """A local SQLite store in the working folder (the default) with erase-toy-striped@production."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id, _ = log_mask_run(uri, "toy", "striped", tmp_path, erasure_rate=0.0, preservation=1.0, seed=3)
    assert main(["promote", "--concept", "striped", "--tracking-uri", uri]) == 0
    return uri, run_id


def test_the_readme_example_gives_the_images_of_erase_masks_apply(registry_with_toy_striped, tmp_path, capsys):
    uri, run_id = registry_with_toy_striped
    scope = {}
    exec(readme_example(), scope)  # loads the toy generator and applies models:/erase-toy-striped@production
    done, generator = scope["done"], scope["generator"]
    assert done["masks"][0]["version"] == "1" and done["masks"][0]["run_id"] == run_id
    assert done["masks"][0]["sha256"] and done["removed_entries"] > 0 and done["dropped_neurons"] == 0
    capsys.readouterr()

    by_command = tmp_path / "command.png"
    assert main(["masks", "apply", "models:/erase-toy-striped@production", "--prompt", "a striped red cross",
                 "--seeds", "0,1", "--out", str(by_command)]) == 0
    images = to_uint8(generate(generator, ["a striped red cross"] * 2, [0, 1]))
    by_api = tmp_path / "api.png"
    save_image_grid([("masked: striped", list(images))], str(by_api), scale=64 // images.shape[1])  # uint8 HWC tiles
    assert np.array_equal(np.asarray(Image.open(by_command)), np.asarray(Image.open(by_api)))


def test_a_changed_registry_artifact_is_refused_by_the_api(registry_with_toy_striped, tmp_path):
    stored = list((tmp_path / "mlartifacts").rglob("mask.safetensors"))
    assert len(stored) == 1
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF
    stored[0].write_bytes(bytes(data))
    generator = load_generator("toy")
    before = {k: v.clone() for k, v in generator.transformer.state_dict().items()}
    with pytest.raises(RegistryError, match="does not match"):
        erase.apply_masks(generator, "models:/erase-toy-striped@production")
    after = generator.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was folded


@pytest.fixture(scope="module")
def tiny_pipeline_folder(tmp_path_factory):
    """flux-tiny saved as a diffusers folder, for FluxPipeline.from_pretrained."""
    folder = tmp_path_factory.mktemp("flux-tiny")
    load_generator("flux-tiny").pipe.save_pretrained(folder)
    return folder


def tiny_mask(folder, random_logits) -> str:
    from erase.masks import Masks, save_mask_file

    sites = mask_sites("flux-tiny")
    path = str(folder / "cat.safetensors")
    save_mask_file(path, Masks(sites, random_logits(sites, seed=7)), model_id="flux-tiny", model_sites=sites,
                   concept="cat")
    return path


def test_a_pipeline_from_pretrained_in_bf16_is_folded_as_the_command_folds(tiny_pipeline_folder, tmp_path,
                                                                            random_logits):
    from diffusers import FluxPipeline

    mask = tiny_mask(tmp_path, random_logits)
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_folder, dtype=torch.bfloat16)
    done = erase.apply_masks(pipe, [mask])
    assert done["removed_entries"] > 0 and pipe.transformer.dtype == torch.bfloat16

    # what `erase masks apply --model flux-tiny --model-path FOLDER --dtype bf16` folds
    generator = load_generator("flux-tiny", str(tiny_pipeline_folder), dtype="bf16")
    sites, combined, _ = load_masks([mask], mask_sites("flux-tiny"), "flux-tiny")
    fold_into_weights(generator.transformer, sites, combined)
    ours, theirs = pipe.transformer.state_dict(), generator.transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    image = pipe("a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all()


def test_dropped_neurons_make_a_smaller_transformer_with_the_folded_outputs(tiny_pipeline_folder, tmp_path,
                                                                           random_logits):
    from diffusers import FluxPipeline

    mask = tiny_mask(tmp_path, random_logits)
    folded, dropped = (FluxPipeline.from_pretrained(tiny_pipeline_folder, dtype=torch.float32) for _ in range(2))
    erase.apply_masks(folded, mask)
    done = erase.apply_masks(dropped, mask, drop_neurons=True)
    count = sum(p.numel() for p in dropped.transformer.parameters())
    assert done["dropped_neurons"] > 0 and count < sum(p.numel() for p in folded.transformer.parameters())

    def image(pipe):
        return pipe("a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    assert np.abs(image(folded) - image(dropped)).max() < 1e-4  # fp32: only the order of float sums differs


def test_apply_masks_refuses_what_it_cannot_use(tmp_path):
    from erase.errors import EraseError

    with pytest.raises(EraseError, match="takes a diffusers FLUX pipeline"):
        erase.apply_masks(torch.nn.Linear(2, 2), "x.safetensors")
    with pytest.raises(EraseError, match="no masks given"):
        erase.apply_masks(load_generator("toy"), [])
    with pytest.raises(RegistryError, match="neither a file nor"):
        erase.apply_masks(load_generator("toy"), str(tmp_path / "missing.safetensors"))
