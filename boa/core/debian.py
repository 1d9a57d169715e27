"""Data shipped as Debian packages (Austen's novels, Fashion-MNIST): fetched with `apt-get download`, unpacked with
`dpkg -x` into a temporary folder — no root, nothing installed."""
from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import tempfile
from pathlib import Path

from boa.core.errors import BoaError


@contextlib.contextmanager
def unpacked_deb(package: str, override_env: str, purpose: str):
    """Yields the root folder of `package` unpacked; $override_env may name a .deb already on disk."""
    deb = os.environ.get(override_env)
    with tempfile.TemporaryDirectory() as tmp:
        if not deb:
            try:
                result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            except FileNotFoundError:  # not a Debian-like system
                result = subprocess.CompletedProcess([], 1, "", "apt-get not found")
            found = glob.glob(os.path.join(tmp, f"{package}_*.deb"))
            if result.returncode != 0 or not found:
                raise BoaError(
                    f"could not fetch Debian's {package} for {purpose} ({result.stderr.strip()[-200:]}). "
                    f"Run `apt-get update` and retry, or download the .deb and set {override_env}=/path/to/it"
                )
            deb = found[0]
        subprocess.run(["dpkg", "-x", deb, os.path.join(tmp, "x")], check=True)
        yield Path(tmp, "x")
