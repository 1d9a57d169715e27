"""boa.pipeline.offload: activation caches on the device, in host memory or on disk give the same tensors back and
the same codes; disk caches clean up after themselves and refuse a folder they cannot write before any work; "auto"
picks the nearest place the activations fit."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import boa
from boa.core.errors import BoaError
from boa.models import adapter_for
from boa.pipeline import OFFLOADS, ActivationCache, BlockInputs, choose_offload
from boa.pipeline import offload as offload_module
from boa.stats import run_block

from conftest import build_llama, random_windows

PLACES = ["device", "cpu", "disk"]


def batches():
    """Tensors of the cache dtypes boa uses, of uneven shapes (the last calibration batch is smaller)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 5, 16, generator=g).to(dtype)
            for n, dtype in ((8, torch.float32), (8, torch.float16), (3, torch.bfloat16))]


@pytest.mark.parametrize("place", PLACES)
def test_a_cache_gives_back_what_it_was_given(place, tmp_path):
    """By index and by iteration, in order, bit for bit, in the stored dtype, on the compute device; an empty cache
    made from it is placed the same way (on disk: in a folder of its own beside it)."""
    stored = batches()
    with ActivationCache(place, torch.device("cpu"), tmp_path) as cache:
        for x in stored:
            cache.append(x)
        assert len(cache) == len(stored)
        for got in (list(cache), [cache[i] for i in range(len(cache))]):
            assert all(a.dtype == b.dtype and torch.equal(a, b) and a.device.type == "cpu"
                       for a, b in zip(got, stored, strict=True))
        with cache.empty_like() as other:
            assert other.placement == place and len(other) == 0
            if place == "disk":
                assert other.folder != cache.folder and other.folder.parent == cache.folder.parent == tmp_path
                assert len(list(cache.folder.glob("*.safetensors"))) == len(stored)


def test_a_disk_cache_leaves_no_files(tmp_path):
    """close() (or the end of a `with` block), garbage collection and the normal end of the process each remove the
    cache's folder."""
    with ActivationCache("disk", torch.device("cpu"), tmp_path) as cache:
        cache.append(torch.ones(3))
        assert cache.folder.is_dir()
    assert list(tmp_path.iterdir()) == []

    dropped = ActivationCache("disk", torch.device("cpu"), tmp_path)
    dropped.append(torch.ones(3))
    del dropped
    assert list(tmp_path.iterdir()) == []

    code = ("import sys, torch\nfrom boa.pipeline import ActivationCache\n"
            "cache = ActivationCache('disk', torch.device('cpu'), sys.argv[1])\ncache.append(torch.ones(3))\n"
            "assert cache.folder.is_dir()\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300)
    assert list(tmp_path.iterdir()) == []


def capture_counting_forwards(offload_dir, offload="disk"):
    model = build_llama()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    block = adapter_for(model.config).blocks(model)[0]
    with pytest.raises(BoaError) as err:
        BlockInputs.capture(model, [block], random_windows(4, 16), torch.float32, with_fp=True, offload=offload,
                            offload_dir=offload_dir)
    assert forwards == []  # refused before anything was computed
    return str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_offload_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        message = capture_counting_forwards(folder)
    finally:
        folder.chmod(0o700)
    assert str(folder) in message and "--offload-dir" in message
    assert list(folder.iterdir()) == []


def test_an_offload_folder_that_cannot_exist_is_refused_before_any_work(tmp_path):
    """A folder below a plain file cannot be made, whoever runs."""
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "activations"
    message = capture_counting_forwards(folder)
    assert str(folder) in message and "--offload-dir" in message


def test_a_filesystem_without_room_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(offload_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    with pytest.raises(BoaError, match="free some space or choose another --offload-dir"):
        ActivationCache("disk", torch.device("cpu"), tmp_path, need_bytes=2**30)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_offload_is_refused():
    for bad in ("gpu", "Disk", ""):
        with pytest.raises(BoaError, match="auto, device, cpu, disk"):
            choose_offload(bad, torch.device("cpu"), 1)
    assert capture_counting_forwards(None, offload="ram").count("auto, device, cpu, disk") == 1
    with pytest.raises(BoaError, match="device, cpu, disk"):
        ActivationCache("auto", torch.device("cpu"))


def fake_memory(monkeypatch, device_free, host_free):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (device_free, 2 * device_free))
    monkeypatch.setattr(offload_module, "host_free_memory", lambda: host_free)


@pytest.mark.parametrize(("device_free", "host_free", "expected"), [
    (10_000, 10_000, "device"),
    (1_000, 10_000, "cpu"),
    (1_000, 1_000, "disk"),
    (1_100, 1_100, "disk"),  # fits, but not with the safety margin
])
def test_auto_on_a_cuda_device(monkeypatch, device_free, host_free, expected):
    fake_memory(monkeypatch, device_free, host_free)
    assert choose_offload("auto", torch.device("cuda"), 1_000) == expected


@pytest.mark.parametrize(("host_free", "expected"), [(10_000, "device"), (1_100, "disk")])
def test_auto_on_the_cpu_where_host_memory_is_the_device(monkeypatch, host_free, expected):
    def no_cuda(device=None):
        raise AssertionError("a CPU device has no CUDA memory to ask about")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    monkeypatch.setattr(offload_module, "host_free_memory", lambda: host_free)
    assert choose_offload("auto", torch.device("cpu"), 1_000) == expected


def test_an_explicit_offload_is_kept_whatever_the_memory(monkeypatch):
    fake_memory(monkeypatch, 0, 0)
    for place in OFFLOADS[1:]:
        assert choose_offload(place, torch.device("cuda"), 10**15) == place


def test_capture_sizes_auto_by_the_activations(monkeypatch, tmp_path):
    """8 windows × 16 tokens × 64 wide × 4 bytes × 2 paths, twice over while a block's outputs are written: 128 KiB,
    which HEADROOM of 200 KiB of host memory holds and of 100 KiB does not."""
    model = build_llama()
    block = adapter_for(model.config).blocks(model)[0]
    placed = {}
    for host_free in (200 * 1024, 100 * 1024):
        monkeypatch.setattr(offload_module, "host_free_memory", lambda: host_free)
        inputs = BlockInputs.capture(model, [block], random_windows(8, 16), torch.float32, True, offload="auto",
                                     offload_dir=tmp_path)
        placed[host_free] = (inputs.hidden.placement, inputs.fp.placement)
        inputs.close()
    assert placed == {200 * 1024: ("device", "device"), 100 * 1024: ("disk", "disk")}


def test_advance_and_restore_keep_the_placement(tmp_path):
    """The next block's inputs go to fresh disk caches (the old ones' files removed), hold the block's outputs, and
    a checkpoint's state restores into disk caches again."""
    model = build_llama()
    block = adapter_for(model.config).blocks(model)[0]
    inputs = BlockInputs.capture(model, [block], random_windows(11, 16), torch.float16, True, offload="disk",
                                 offload_dir=tmp_path)
    old = [inputs.hidden, inputs.fp]
    with torch.no_grad():
        expected = run_block(block, list(inputs.hidden), inputs.kwargs, torch.float16)
        inputs.advance(block, [x + 1 for x in expected])
    assert {inputs.hidden.placement, inputs.fp.placement} == {"disk"}
    assert not any(cache.folder.exists() or len(cache) for cache in old)  # closed, whoever still holds them
    assert set(tmp_path.iterdir()) == {inputs.hidden.folder, inputs.fp.folder}
    assert all(torch.equal(a, b) for a, b in zip(inputs.hidden, expected, strict=True))
    assert all(torch.equal(a, b + 1) for a, b in zip(inputs.fp, expected, strict=True))

    state = inputs.state()
    assert all(x.device.type == "cpu" and x.dtype == torch.float16 for x in state.values())
    inputs.restore({k: v * 2 for k, v in state.items()}, 0)
    assert {inputs.hidden.placement, inputs.fp.placement} == {"disk"}
    assert len(list(tmp_path.iterdir())) == 2
    assert all(torch.equal(a, b * 2) for a, b in zip(inputs.hidden, expected, strict=True))
    inputs.close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def captured(monkeypatch):
    """The BlockInputs boa.quantize makes (BlockInputs.capture, spied on)."""
    made = []
    capture = BlockInputs.capture

    def spy(*args, **kwargs):
        made.append(capture(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(BlockInputs, "capture", spy)
    return made


@pytest.mark.parametrize("method", [boa.GPTQ(bits=3, group_size=16), boa.TurboBoA(bits=3, group_size=16)],
                         ids=["gptq", "turboboa"])
def test_the_codes_do_not_depend_on_where_the_activations_live(method, captured, tmp_path):
    codes = {}
    for place in PLACES:
        files = []

        def look(index):  # mid-run: the caches as placed
            inputs = captured[-1]
            assert inputs.hidden.placement == place and len(inputs.hidden) == 2
            assert (inputs.fp is not None) == method.needs().dx
            if place == "disk":
                files.append(len(list(inputs.hidden.folder.glob("*.safetensors"))))

        config = boa.QuantConfig(method, cache_dtype="bfloat16")
        result = boa.pipeline.quantize(build_llama(), config, random_windows(12, 16), progress=False, offload=place,
                                       offload_dir=tmp_path, on_block_done=look)
        assert files == ([2, 2] if place == "disk" else [])
        assert list(tmp_path.iterdir()) == []  # closed when the run ended
        codes[place] = {k: (q.codes, q.scale, q.zero) for k, q in result.layers.items()}
    for place in PLACES[1:]:
        assert codes[place].keys() == codes["device"].keys()
        for name, tensors in codes[place].items():
            assert all(torch.equal(a, b) for a, b in zip(tensors, codes["device"][name])), (place, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_memory_is_pinned_for_a_cuda_device(tmp_path):
    device = torch.device("cuda")
    stored = [x.to(device) for x in batches()]
    for place in ("cpu", "disk"):
        with ActivationCache(place, device, tmp_path) as cache:
            for x in stored:
                cache.append(x)
            if place == "cpu":
                assert all(cache.stored(i).is_pinned() for i in range(len(cache)))
            assert all(a.device.type == "cuda" and torch.equal(a, b) for a, b in zip(cache, stored, strict=True))


def test_auto_keeps_the_activations_in_memory_where_free_memory_cannot_be_told(monkeypatch):
    """No /proc/meminfo nor sysconf (a platform boa cannot ask): auto keeps what a plain run keeps, never errs."""
    fake_memory(monkeypatch, 1_000, None)
    assert choose_offload("auto", torch.device("cpu"), 10**15) == "device"
    assert choose_offload("auto", torch.device("cuda"), 10**15) == "cpu"
