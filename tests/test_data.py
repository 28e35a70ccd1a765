"""Prompt files, a sweep worker's shard of the prompts (the rows and order of the local loop), adversarial sets."""

import json

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest

from erase.data import read_adversarial, read_shard
from erase.prompts import PromptError, read_prompts
from erase.train import prompt_rows

PROMPTS = ["a red circle", "a blue square", "a green bar"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().execution_options.preserve_order = True  # as a study sets it
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
def test_every_format_reads_the_same_prompts(prompt_files, name, column):
    assert read_prompts(str(prompt_files / name), "concept prompt", column) == PROMPTS


def test_missing_column_names_the_columns(prompt_files):
    with pytest.raises(PromptError, match="no column 'prompt'.*text"):
        read_prompts(str(prompt_files / "p.parquet"), "concept prompt", "prompt")
    with pytest.raises(PromptError, match="no column 'prompt'.*text"):
        read_prompts(str(prompt_files / "p.csv"), "concept prompt", "prompt")
    with pytest.raises(PromptError, match="does not exist"):
        read_prompts(str(prompt_files / "nope.parquet"), "concept prompt")
    (prompt_files / "p.xlsx").write_bytes(b"PK")
    with pytest.raises(PromptError, match="unknown type"):
        read_prompts(str(prompt_files / "p.xlsx"), "concept prompt")


def test_a_workers_shard_holds_the_rows_of_the_local_loop_in_their_order(ray_local):
    # a sweep's prompt dataset is made from prompt_rows; one worker's shard gives them back in order,
    # so it trains on the batches `erase train` draws from the same prompts
    rows = prompt_rows(PROMPTS * 4, first_seed=500, noises_per_prompt=2)
    dataset = ray_local.data.from_items(rows).materialize()
    (shard,) = dataset.streaming_split(1)
    assert read_shard(shard) == rows
    halves = dataset.streaming_split(2, equal=True)
    import threading  # the shards of a split are read concurrently, as the workers of a trial do

    read = [None, None]
    readers = [threading.Thread(target=lambda i=i: read.__setitem__(i, read_shard(halves[i]))) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=120)
    assert sorted(read[0] + read[1], key=lambda r: r["seed"]) == sorted(rows, key=lambda r: r["seed"])
    with pytest.raises(PromptError, match="more prompts than workers"):
        read_shard(ray_local.data.from_items([{"prompt": "x", "seed": 1}]).limit(0).iterator())


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
    from erase.sweep import StudySpec
    from erase.sweep.study import prompt_datasets

    erase_prompts, neutral = prompt_sets("toy", "cross")
    noises = recipe_defaults("toy", "cross")["noises_per_prompt"]
    assert noises > 1  # otherwise this test shows nothing
    spec = StudySpec(sweep_id="t", concept="cross")
    datasets, _ = prompt_datasets(spec, fixed={})
    assert datasets["erase"].count() == len(erase_prompts) * noises
    assert datasets["neutral"].count() == len(neutral) * noises
    datasets, _ = prompt_datasets(spec, fixed={"noises_per_prompt": 1})
    assert datasets["erase"].count() == len(erase_prompts)
