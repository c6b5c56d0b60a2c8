"""What the CPU does natively: bf16 matrix units (AVX512-BF16, AMX), and whether bf16 on CPU will pay.

On a CPU without them, PyTorch runs bf16 matmuls by converting to fp32 and back (oneDNN's emulation), so
``--trainer.precision bf16-mixed`` or ``model.dtype: bfloat16`` is *slower* than fp32 there
(``docs/benchmarks/bf16.json``). On CPUs with AVX512-BF16 or AMX a bf16 matmul runs on the matrix units
(~3x fp32 measured elsewhere, issue 21). ``bf16_advice`` says which case a run is in, before it starts.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_FLAGS = {"avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16"}


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags from ``path`` (empty where there is no such file, e.g. macOS)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_features() -> dict[str, bool]:
    """``{"avx512_bf16": ..., "amx_bf16": ...}`` for this CPU: PyTorch's own probes, else /proc/cpuinfo."""
    probe = {"avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
             "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None)}
    flags = _cpuinfo_flags()
    out = {}
    for name, fn in probe.items():
        try:
            out[name] = bool(fn()) if fn is not None else _FLAGS[name] in flags
        except RuntimeError:  # a build without the probe's backend
            out[name] = _FLAGS[name] in flags
    return out


def cpu_bf16_native() -> bool:
    """Whether bf16 matmuls run natively on this CPU (AVX512-BF16 or AMX)."""
    return any(cpu_bf16_features().values())


def bf16_advice(precision: object, dtype: str, on_cpu: bool) -> str | None:
    """One line for a run that asks for bf16 on a CPU without native bf16 (None when nothing needs saying).

    ``precision`` is the Trainer's (``"bf16-mixed"``, ``"bf16-true"``, 32, ...), ``dtype`` the model's weights
    (``model.dtype``), ``on_cpu`` whether the run trains on the CPU.
    """
    asks = "bf16" in str(precision) or dtype == "bfloat16"
    if not (asks and on_cpu) or cpu_bf16_native():
        return None
    what = f"trainer.precision {precision}" if "bf16" in str(precision) else "model.dtype bfloat16"
    return (f"{what}: this CPU has no native bf16 (no AVX512-BF16 or AMX; PyTorch reports "
            f"{torch.backends.cpu.get_cpu_capability()}), so bf16 is emulated and slower than fp32 here; "
            "keep the default (precision 32, dtype float32) on this machine")
