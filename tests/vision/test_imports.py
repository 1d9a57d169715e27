"""`import boa.vision` (and every name it exports) loads the CNN path only: no transformers, no LLM path."""
import subprocess
import sys

FORBIDDEN = ("transformers", "boa.stats", "boa.models", "boa.pipeline", "boa.algorithms")

CHECK = f"""
import sys, types
import boa.vision
for name in boa.vision.__all__:
    value = getattr(boa.vision, name)
    assert not isinstance(value, types.ModuleType), name  # a submodule must not shadow an exported function
import boa
for name in ("VisionQuantConfig", "quantize_vision", "load_vision", "save_vision", "load_vision_model"):
    assert getattr(boa, name) is getattr(boa.vision, name), name
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {FORBIDDEN!r}))
print(" ".join(loaded))
"""


def test_vision_imports_no_llm_path():
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []


def test_bare_import_is_light():
    """`import boa.vision` alone defers even torch-heavy CNN modules to first use."""
    code = "import sys, boa.vision; print(' '.join(sorted(m for m in sys.modules if m.startswith('boa.vision.'))))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []
