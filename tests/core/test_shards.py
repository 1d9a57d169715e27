"""boa.core.shards: tensors written one at a time into Hugging Face-convention shards read back exactly (by boa's
reader and by safetensors itself), each shard within its size, the index naming them."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from boa.core.errors import BoaError
from boa.core.shards import INDEX, SINGLE, ShardReader, ShardWriter, parse_size, weight_files


def tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(30, 40, generator=gen),                    # 4800 bytes
        "a.bias": torch.randn(30, generator=gen).to(torch.bfloat16),
        "b.codes": torch.randint(0, 255, (64, 64), generator=gen).to(torch.uint8),
        "b.mask": torch.rand(7, generator=gen) > 0.5,
        "c.big": torch.randn(100, 100, generator=gen, dtype=torch.float64),  # 80000 bytes: a shard of its own
        "d.scalar": torch.tensor(3, dtype=torch.int64),
    }


def write(folder, max_bytes, items):
    writer = ShardWriter(folder, max_bytes, metadata={"boa_fingerprint": "abc"})
    for name, tensor in items.items():
        writer.add(name, tensor)
    return writer.finish()


def test_shards_round_trip_within_their_size(tmp_path):
    items = tensors()
    names = write(tmp_path, 10_000, items)
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(items) and set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in items.values())
    for path in weight_files(tmp_path):
        loaded = load_file(str(path))  # safetensors' own reader
        big = any(t.numel() * t.element_size() > 10_000 for t in loaded.values())
        assert big and len(loaded) == 1 or sum(t.numel() * t.element_size() for t in loaded.values()) <= 10_000
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"boa_fingerprint": "abc"}
    reader = ShardReader(tmp_path)
    assert sorted(reader.keys()) == sorted(items)
    for name, tensor in items.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    items = tensors()
    assert write(tmp_path, 10**9, items) == [SINGLE]
    assert not (tmp_path / INDEX).exists()
    loaded = load_file(str(tmp_path / SINGLE))
    assert all(torch.equal(loaded[k], v) for k, v in items.items())


def test_a_tensor_written_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, 100)
    writer.add("x", torch.zeros(40))
    writer.add("y", torch.zeros(40))  # closes the first shard
    with pytest.raises(ValueError, match="written twice"):
        writer.add("x", torch.zeros(1))


def test_a_missing_shard_or_damaged_index_is_named(tmp_path):
    names = write(tmp_path, 10_000, tensors())
    (tmp_path / names[1]).unlink()
    with pytest.raises(BoaError, match=f"missing shard.*{names[1]}"):
        ShardReader(tmp_path)
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(BoaError, match="damaged"):
        ShardReader(tmp_path)


@pytest.mark.parametrize("text, value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 1024**3),
                                         ("1234", 1234), (77, 77), ("1.5kb", 1500)])
def test_sizes_parse(text, value):
    assert parse_size(text) == value


def test_a_bad_size_is_refused():
    with pytest.raises(BoaError, match="5GB, 500MB"):
        parse_size("five gigabytes")
