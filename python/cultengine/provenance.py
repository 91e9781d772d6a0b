"""What produced a result: the run section of every report (bench, studies, compare).

`collect` gathers cultengine's version, the checkpoint's name and hash, the data files' hashes, the command
line, the date, the machine and the versions of the libraries the numbers depend on. Hashes are sha256 of
the whole files; a checkpoint's hash covers every file of its directory (weights, config, tokenizer), and is
remembered per (path, size, mtime) under the cultengine cache so a 14 GB checkpoint is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .paths import cache_dir
from .version import __version__

LIBRARIES = ("cultengine", "torch", "transformers", "torchvision", "Pillow", "numpy", "triton")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cache_file() -> Path:
    return cache_dir() / "file-hashes.json"


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (absolute path, size, mtime) so large weights are hashed once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = file_sha256(path)
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0), encoding="utf-8")
            tmp.replace(cache_path)
        except OSError:
            pass  # a read-only cache only costs rehashing next time
    return cache[key]


def checkpoint_hash(model: str | Path) -> str | None:
    """sha256 over (relative name, sha256) of every file of a checkpoint directory, in name order."""
    root = Path(model)
    if not root.is_dir():
        return cached_sha256(root) if root.is_file() else None
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts):
        h.update(f"{f.relative_to(root).as_posix()}\0{cached_sha256(f)}\n".encode())
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    torch = sys.modules.get("torch")  # only when the run already imported it: no import cost for reports
    if torch is not None and torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def is_demo(model: str | Path | None) -> bool:
    """Whether `model` names the built-in demo checkpoint (random weights)."""
    if model in (None, ""):
        return False
    if str(model) == "demo":
        return True
    cfg = Path(model) / "config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("cultengine_demo"))
    except (OSError, ValueError):
        return False


def command_line(argv: Sequence[str]) -> str:
    """The command as typed: `python -m cultengine.cli ...` and the console script both read `cultengine ...`."""
    argv = list(argv)
    if argv and (Path(argv[0]).name == "cultengine" or Path(argv[0]).resolve().parent == Path(__file__).parent):
        argv[0] = "cultengine"
    return shlex.join(argv)


def collect(
    model: str | Path | None = None,
    data: Sequence[str | Path] = (),
    engine: Any = None,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The run section: versions, checkpoint, data hashes, command line, date, machine. `engine` is an
    `Engine` or what its `provenance()` returned (image processor and path, checkpoint)."""
    image = engine.provenance() if hasattr(engine, "provenance") else engine if isinstance(engine, dict) else {}
    if model is None:  # an engine knows where its checkpoint came from
        model = image.get("checkpoint")
    out: dict[str, Any] = {
        "cultengine": __version__,
        "command": command_line(sys.argv if argv is None else argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "libraries": library_versions(),
        "image_processor": image.get("image_processor"),
        "image_backend": image.get("image_backend"),
    }
    if image.get("settings"):
        out["engine_settings"] = image["settings"]
    if model is not None:
        out["checkpoint"] = {
            "name": Path(str(model)).name,
            "path": str(model),
            "sha256": checkpoint_hash(model),
            "demo": is_demo(model),
        }
    out["data"] = [{"file": str(p), "sha256": file_sha256(p) if Path(p).is_file() else None} for p in data]
    return out


def markdown(run: dict[str, Any]) -> list[str]:
    """The run section as markdown lines (a `## Run` heading and one bullet per fact)."""
    lines = ["## Run", ""]
    if "cultengine" in run:
        lines.append(f"- cultengine {run['cultengine']}")
    ckpt = run.get("checkpoint")
    if ckpt:
        demo = " (demo checkpoint, random weights)" if ckpt.get("demo") else ""
        lines.append(f"- checkpoint: {ckpt['name']}{demo}, sha256 {ckpt.get('sha256')}, at {ckpt['path']}")
    lines += [f"- data: {d['file']}, sha256 {d['sha256']}" for d in run.get("data", [])]
    for key in ("command", "date"):
        if run.get(key):
            lines.append(f"- {key}: {run[key]}")
    if run.get("machine"):
        lines.append("- machine: " + ", ".join(f"{k} {v}" for k, v in run["machine"].items()))
    if run.get("libraries"):
        lines.append("- libraries: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in run["libraries"].items()))
    if "image_backend" in run:
        lines.append(f"- image preprocessing backend: {run['image_backend'] or 'not reported by this engine'}")
    if run.get("engine_settings"):
        lines.append("- engine settings: " + ", ".join(f"{k} {v}" for k, v in run["engine_settings"].items()))
    for k, v in run.get("engine", {}).items():
        lines.append(f"- engine {k}: {v}")
    return lines + [""]
