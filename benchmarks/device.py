"""The machine a run measures: device choice, a folder-friendly name for it, and its description."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"unsupported device {name!r}: use cpu or cuda")
    return device


def cpu_model() -> str:
    """The processor's model name, from /proc/cpuinfo (or platform as a fallback)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list:
    """The SIMD extensions that matter for the kernels (avx2, avx512f, avx512_bf16, ...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = (
                        "avx2",
                        "fma",
                        "avx512f",
                        "avx512bw",
                        "avx512vl",
                        "avx512_bf16",
                        "amx_bf16",
                    )
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def device_name(device: torch.device) -> str:
    """A human name: 'cpu (<model>)' for CPUs, the GPU's own name for CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()})"


def slug(device: torch.device) -> str:
    """The results folder name: 'cpu-<model>' or the GPU's name, lower-case and dashed."""
    raw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{cpu_model()}"
    raw = re.sub(r"\((r|tm)\)", "", raw.lower())
    return re.sub(r"[^a-z0-9]+", "-", raw).strip("-") or "unknown"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # an import failure of any kind means "not available"
        return None


def _liger_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


def _thp() -> Optional[str]:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        return None


def machine_info(device: torch.device) -> dict:
    """Everything needed to interpret the numbers later (copy bandwidth is added by the caller)."""
    info = {
        "device": device_name(device),
        "slug": slug(device),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _liger_version(),
        "softmax_ext": _version("softmax_ext"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Environment that changes CPU allocation or threading (and so the numbers).
    info["env"] = {
        k: v
        for k, v in os.environ.items()
        if k
        in (
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "THP_MEM_ALLOC_ENABLE",
            "LD_PRELOAD",
            "OMP_WAIT_POLICY",
            "CUDA_VISIBLE_DEVICES",
            "TORCHINDUCTOR_FREEZING",
        )
        or k.startswith("MALLOC_")
    }
    info["transparent_hugepages"] = _thp()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_sms=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info
