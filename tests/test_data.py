"""Prompt files through Ray Data and pyarrow, the seeds they get, and the adversarial set loaders."""

import json

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest

from erase.data import endless_batches, read_adversarial, read_prompt_dataset, with_seeds
from erase.prompts import PromptError, read_prompts
from erase.train import prompt_rows

PROMPTS = ["a red circle", "a blue square", "a green bar"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def prompt_files(tmp_path):
    table = pa.table({"text": PROMPTS, "other": [1, 2, 3]})
    pyarrow.parquet.write_table(table, tmp_path / "p.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "p.csv")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p, "other": 0}) + "\n" for p in PROMPTS))
    (tmp_path / "p.txt").write_text("# a comment\n" + "\n".join(PROMPTS) + "\n\n")
    return tmp_path


@pytest.mark.parametrize("name, column", [("p.parquet", "text"), ("p.csv", "text"), ("p.jsonl", "text"), ("p.txt", "prompt")])
def test_every_format_reads_the_same_prompts(prompt_files, ray_local, name, column):
    path = str(prompt_files / name)
    assert read_prompts(path, "concept prompt", column) == PROMPTS
    ds = with_seeds(read_prompt_dataset(path, column), first_seed=0, noises_per_prompt=1)
    assert sorted(r["prompt"] for r in ds.take_all()) == sorted(PROMPTS)


def test_missing_column_names_the_columns(prompt_files, ray_local):
    with pytest.raises(PromptError, match="no column 'prompt'.*text"):
        read_prompt_dataset(str(prompt_files / "p.parquet"), "prompt")
    with pytest.raises(PromptError, match="no column 'prompt'.*text"):
        read_prompts(str(prompt_files / "p.csv"), "concept prompt", "prompt")
    with pytest.raises(PromptError, match="does not exist"):
        read_prompt_dataset(str(prompt_files / "nope.parquet"))
    (prompt_files / "p.xlsx").write_bytes(b"PK")
    with pytest.raises(PromptError, match="unknown type"):
        read_prompts(str(prompt_files / "p.xlsx"), "concept prompt")


def test_streamed_rows_get_the_seeds_of_the_local_loop(ray_local):
    ds = with_seeds(ray_local.data.from_items([{"prompt": p} for p in PROMPTS]), first_seed=500, noises_per_prompt=2)
    streamed = sorted((r["prompt"], r["seed"]) for r in ds.take_all())
    local = sorted((r["prompt"], r["seed"]) for r in prompt_rows(PROMPTS, 500, 2))
    assert streamed == local and len(set(s for _, s in local)) == 6


def test_endless_batches_cycle_a_small_shard(ray_local):
    ds = ray_local.data.from_items(prompt_rows(PROMPTS, 0, 1))
    batches = endless_batches(ds.iterator(), batch_size=2)
    seen = [next(batches) for _ in range(6)]  # 12 examples from 3 rows: four passes
    assert all(len(p) == 2 and len(s) == 2 for p, s in seen)
    prompts = [p for batch, _ in seen for p in batch]
    assert {prompts.count(p) for p in PROMPTS} == {4}


def test_adversarial_loaders(tmp_path):
    i2p = pa.table({"prompt": ["p1", "p2", "p3", None], "nudity_percentage": [80.0, 10.0, 50.0, 90.0],
                    "categories": ["sexual"] * 4})
    pyarrow.csv.write_csv(i2p, tmp_path / "i2p.csv")
    assert read_adversarial("i2p", str(tmp_path / "i2p.csv")) == ["p1", "p3"]
    assert read_adversarial("i2p", str(tmp_path / "i2p.csv"), min_nudity=60) == ["p1"]
    mma = pa.table({"adv_prompt": ["x y z"], "clean_prompt": ["clean"]})
    pyarrow.parquet.write_table(mma, tmp_path / "mma.parquet")
    assert read_adversarial("mma-diffusion", str(tmp_path / "mma.parquet")) == ["x y z"]
    rab = pa.table({"sensitive prompt": ["q"]})
    pyarrow.csv.write_csv(rab, tmp_path / "rab.csv")
    assert read_adversarial("ring-a-bell", str(tmp_path / "rab.csv")) == ["q"]
    with pytest.raises(PromptError, match="none of the columns prompt"):
        read_adversarial("p4d", str(tmp_path / "mma.parquet"))
    with pytest.raises(PromptError, match="unknown adversarial set"):
        read_adversarial("jailbreak", str(tmp_path / "rab.csv"))
    assert read_adversarial("p4d", str(tmp_path / "mma.parquet"), column="clean_prompt") == ["clean"]


def test_sweep_prompt_streams_take_the_recipe_noises_unless_the_space_fixes_them(ray_local):
    from erase.pipelines import recipe_defaults
    from erase.prompts import prompt_sets
    from erase.sweep import SweepSpec, _prompt_sets

    erase_prompts, neutral = prompt_sets("toy", "cross")
    noises = recipe_defaults("toy", "cross")["noises_per_prompt"]
    assert noises > 1  # otherwise this test shows nothing
    spec = SweepSpec(sweep_id="t", concept="cross")
    datasets, _ = _prompt_sets(spec, fixed={})
    assert datasets["erase"].count() == len(erase_prompts) * noises
    assert datasets["neutral"].count() == len(neutral) * noises
    datasets, _ = _prompt_sets(spec, fixed={"noises_per_prompt": 1})
    assert datasets["erase"].count() == len(erase_prompts)
