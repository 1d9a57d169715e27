"""boa_kernels.loader: a process killed while torch held its build lock (a plain file torch never removes) must not
make every later load wait forever — boa's own lock (flock, released with its process) clears it."""
import os
import subprocess
import sys
import time

import pytest

from boa_kernels.loader import build_dir, cpu_signature, load_cpu


def test_a_stale_torch_lock_does_not_block_the_next_load():
    if load_cpu() is None:
        pytest.skip("no C++ compiler: nothing is built")
    folder = build_dir(f"cpu-{cpu_signature()}")
    (folder / "lock").write_text("")  # what a SIGKILL during torch's load leaves behind
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # torch would wait on its stale lock forever (the timeout fails the test); no wall-clock bound beyond that: a
    # rebuild on a busy machine took 150 s
    proc = subprocess.run([sys.executable, "-c", "from boa_kernels.loader import load_cpu; assert load_cpu()"],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (folder / "lock").exists()


def test_a_killed_loader_leaves_nothing_that_blocks(tmp_path):
    """A loader SIGKILLed while it holds boa's lock: the next one gets it at once."""
    if load_cpu() is None:
        pytest.skip("no C++ compiler: nothing is built")
    folder = build_dir(f"cpu-{cpu_signature()}")
    code = ("import time, boa_kernels.loader as l, pathlib\n"
            f"with l.build_lock(pathlib.Path({str(folder)!r})):\n"
            f"    pathlib.Path({str(folder / 'lock')!r}).write_text('')\n"
            f"    pathlib.Path({str(tmp_path / 'held')!r}).write_text('')\n"
            "    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "held").exists() and time.time() < deadline:
            time.sleep(0.1)
        holder.kill()
        holder.wait()
        proc = subprocess.run([sys.executable, "-c", "from boa_kernels.loader import load_cpu; assert load_cpu()"],
                              env=env, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        holder.kill()
