"""Know the machine: which backend, how much memory the swarm may use, which tier, what fits.

`detect(memory_limit_gb)` -> `HardwareProfile`. Detection imports torch and mlx lazily, inside
functions, and never fails: any problem with an accelerator falls back to CPU, and the reason
says what was tried. Order: CUDA/ROCm (torch.cuda, ROCm when torch.version.hip is set), then MLX
(mlx.core.metal: Apple's own framework, 20-30% faster than MPS for LoRA), then MPS
(torch.backends.mps), then CPU.

Usable memory is what the swarm may plan with: the total minus a reserve for the OS and other
apps (`RESERVE`, one table), capped by Metal's recommended working set on MLX and by
`--memory-limit`. The tier comes from backend and usable memory (`tier_for`, one place).

CLI: `python -m swarm.hardware [--json] [--memory-limit GB] [--model PATH | --params 7B]
[--seq-len N] [--micro-batch N] [--no-probe]`. Without a model: the machine and what fits (sizes
0.5B..30B x QLoRA/LoRA/full: fits, largest micro-batch at the sequence length, predicted peak at
micro-batch 1). With one: the estimate breakdown per method. In JSON, `params` is always the
parameter count (int) and `name` the size's label ("7B") or the model directory's name.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from swarm import SwarmError
from swarm.cli import Parser

GiB = 1 << 30
MiB = 1 << 20

BACKENDS = ("cuda", "rocm", "mps", "mlx", "cpu")
UNIFIED = ("mps", "mlx")      # Apple unified memory: the GPU shares RAM with the OS and every app
DISCRETE = ("cuda", "rocm")   # own VRAM

#: Memory held back from the swarm: max(minimum bytes, fraction of total).
#: - cpu: a general-purpose computer keeps running its OS, browser and editor: max(2 GiB, 25%).
#: - unified (mps, mlx): the same RAM is the GPU's and everybody else's, and macOS swaps rather
#:   than fails, so real headroom: max(4 GiB, 25%) (an 8 GB Mac keeps 4, a 16 GB one 12).
#: - discrete (cuda, rocm): VRAM is the GPU's own; the desktop and driver take some: max(512 MiB, 5%).
#:   (The CUDA context itself is in the memory model's framework overhead, not here.)
RESERVE: dict[str, tuple[int, float]] = {
    "cpu": (2 * GiB, 0.25),
    "unified": (4 * GiB, 0.25),
    "discrete": (512 * MiB, 0.05),
}

#: The reference's hardware tiers (shared/reference/consumer-hardware-for-ai-training.txt §2), as
#: identifiers, with the boundaries `tier_for` uses. Memory decides what fits, so an Apple tier is
#: chosen by usable memory, not by chip: a 16 GB Mac mini has the 16 GB MacBook Air's ~12 GiB.
TIERS: dict[str, str] = {
    "entry": "Apple unified memory, < 16 GiB usable (MacBook Air 8-16 GB): 0.5B-1B, 3B with QLoRA",
    "sweet-spot": "Apple unified memory, 16-40 GiB usable (Mac mini Pro 24-48 GB): 3B, 7B with QLoRA",
    "workhorse": "Apple unified memory, >= 40 GiB usable (Mac Studio 64-192 GB): 7B-13B LoRA, 30B QLoRA",
    "raw-power": "discrete GPU (CUDA/ROCm), >= 20 GiB usable (RTX 4090/3090, RX 7900 XTX): fastest, <= 13B QLoRA",
    "budget-gpu": "discrete GPU (CUDA/ROCm), < 20 GiB usable (RTX 3060 12 GB, 3080 10 GB, 4060 8 GB): <= 7B QLoRA",
    "cpu-only": "no usable accelerator: small models only, slowly",
}
APPLE_SWEET_SPOT_BYTES = 16 * GiB
APPLE_WORKHORSE_BYTES = 40 * GiB
GPU_RAW_POWER_BYTES = 20 * GiB


def tier_for(backend: str, usable_bytes: int) -> str:
    """The tier of a machine from its backend and usable memory (see `TIERS`)."""
    if backend not in BACKENDS:
        raise SwarmError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "cpu":
        return "cpu-only"
    if backend in DISCRETE:
        return "raw-power" if usable_bytes >= GPU_RAW_POWER_BYTES else "budget-gpu"
    if usable_bytes >= APPLE_WORKHORSE_BYTES:
        return "workhorse"
    return "sweet-spot" if usable_bytes >= APPLE_SWEET_SPOT_BYTES else "entry"


#: Apple silicon memory bandwidth in GB/s (Apple's spec sheets). Where a chip came in two
#: bandwidths (binned M3 Max / M4 Max), the lower one: we cannot tell them apart by name.
APPLE_BANDWIDTH_GBPS: dict[str, float] = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 300, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 410,
    "M5": 153,
}


@dataclass(frozen=True)
class HardwareProfile:
    """This machine as the swarm sees it. Every detected setting carries its reason."""

    backend: str                   # cuda | rocm | mps | mlx | cpu
    backend_reason: str
    device: str
    memory_total_bytes: int
    memory_usable_bytes: int       # what the swarm may plan with
    memory_reason: str             # how usable was derived from total
    memory_bandwidth_bytes_per_s: int | None
    bandwidth_source: str | None
    unified_memory: bool
    tier: str
    unusable_gpu: str | None = None  # a GPU this machine has but the installed torch cannot train on: why

    @property
    def memory_reserved_bytes(self) -> int:
        return self.memory_total_bytes - self.memory_usable_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["memory_reserved_bytes"] = self.memory_reserved_bytes
        return d


# ------------------------------------------------------------------------------------ probes


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0]}" if s else type(e).__name__


def _import(name: str):
    """(module, None) or (None, why not)."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - a broken install must not stop detection
        return None, f"{name} not importable ({_first_line(e)})"


def _cgroup_limit() -> int | None:
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def _system_memory() -> tuple[int, str]:
    """(bytes of RAM this process may use, where the figure comes from)."""
    import psutil

    total = int(psutil.virtual_memory().total)
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        return limit, "container memory limit"
    return total, "physical memory"


def _cpu_name() -> str:
    if sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string")
        if name:
            return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def apple_bandwidth(device_name: str) -> int | None:
    """Bytes/s of an Apple chip from its name ("Apple M2 Pro"), None if unknown."""
    m = re.search(r"\bM(\d+)(?:\s+(Pro|Max|Ultra))?\b", device_name or "")
    if not m:
        return None
    gbps = APPLE_BANDWIDTH_GBPS.get(f"M{m.group(1)}" + (f" {m.group(2)}" if m.group(2) else ""))
    return int(gbps * 1e9) if gbps else None


PCI_DEVICES = Path("/sys/bus/pci/devices")
GPU_VENDORS = {"0x10de": "NVIDIA", "0x1002": "AMD"}  # discrete GPUs torch.cuda could drive (CUDA, ROCm)


def pci_gpus(root: Path = PCI_DEVICES) -> list[str]:
    """NVIDIA and AMD display controllers on the PCI bus (Linux sysfs), as 'AMD GPU 1002:67df'; [] elsewhere."""
    out = []
    try:
        for dev in sorted(root.iterdir())[:256]:
            try:
                cls, vendor = (dev / "class").read_text().strip(), (dev / "vendor").read_text().strip()
                device = (dev / "device").read_text().strip()
            except OSError:
                continue
            if cls.startswith("0x03") and vendor in GPU_VENDORS:
                out.append(f"{GPU_VENDORS[vendor]} GPU {vendor[2:]}:{device[2:]}")
    except OSError:
        return []
    return out


def _device_runs(torch) -> str | None:
    """Why torch cannot run a small matmul on device 0, or None: a GPU torch lists may still be one its build has
    no kernels for (an RX 580, gfx803, under a ROCm that dropped it; an old card under a new CUDA build), which
    would otherwise fail in the middle of the first round."""
    try:
        x = torch.ones((8, 8), device="cuda:0")
        float((x @ x).sum().item())
        return None
    except Exception as e:  # noqa: BLE001
        return _first_line(e)


def _probe_cuda(torch) -> tuple[dict | None, str]:
    """A CUDA or ROCm device through torch.cuda (ROCm builds of torch expose HIP there)."""
    try:
        if not torch.cuda.is_available():
            build = getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None)
            why = f"torch {torch.__version__}: no CUDA/ROCm device" + ("" if build else " (CPU-only build)")
            gpus = pci_gpus()
            if gpus:
                fix = "install a CUDA or ROCm build of torch that supports it" if not build else \
                    "this build or its driver does not support it"
                why += f", though this machine has {', '.join(gpus)}: not viable for training here ({fix})"
            return None, why
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        broken = _device_runs(torch)
        if broken:
            return None, (f"torch {torch.__version__} lists {props.name} but cannot run on it ({broken}): "
                          "not viable for training with this torch build")
        hip = getattr(torch.version, "hip", None)
        backend = "rocm" if hip else "cuda"
        kind = f"ROCm (HIP {hip})" if hip else f"CUDA {getattr(torch.version, 'cuda', '') or ''}".strip()
        # DRAM moves data on both clock edges: bytes/s = 2 x bus bytes x memory clock (kHz in props)
        clock, bus = getattr(props, "memory_clock_rate", 0) or 0, getattr(props, "memory_bus_width", 0) or 0
        bw = int(2 * (bus / 8) * clock * 1000) if clock and bus else None
        return {
            "backend": backend, "device": str(props.name), "total": int(props.total_memory),
            "bandwidth": bw, "bandwidth_source": "device properties (2 x bus width x memory clock)" if bw else None,
            "reason": f"torch {torch.__version__} sees {count} {kind} device{'s' if count > 1 else ''}; using device 0",
        }, ""
    except Exception as e:  # noqa: BLE001
        return None, f"torch CUDA probe failed ({_first_line(e)})"


def _probe_mlx() -> tuple[dict | None, str]:
    mx, why = _import("mlx.core")
    if mx is None:
        return None, why
    try:
        if not mx.metal.is_available():
            return None, f"mlx {getattr(mx, '__version__', '?')}: Metal not available"
        info_fn = getattr(mx, "device_info", None) or mx.metal.device_info
        info = dict(info_fn())
        total, where = _system_memory()
        total = int(info.get("memory_size") or total)
        name = str(info.get("device_name") or _cpu_name())
        bw = apple_bandwidth(name)
        return {
            "backend": "mlx", "device": name, "total": total,
            "working_set": int(info["max_recommended_working_set_size"]) if info.get("max_recommended_working_set_size") else None,
            "bandwidth": bw, "bandwidth_source": "Apple spec sheet for this chip" if bw else None,
            "reason": f"mlx {getattr(mx, '__version__', '?')} with Metal (Apple's native framework; faster than MPS for LoRA)",
        }, ""
    except Exception as e:  # noqa: BLE001
        return None, f"mlx Metal probe failed ({_first_line(e)})"


def _probe_mps(torch) -> tuple[dict | None, str]:
    try:
        mps = getattr(getattr(torch, "backends", None), "mps", None)
        if mps is None or not mps.is_available():
            return None, f"torch {torch.__version__}: MPS not available"
        total, _ = _system_memory()
        name = _cpu_name()
        bw = apple_bandwidth(name)
        return {
            "backend": "mps", "device": name, "total": total, "bandwidth": bw,
            "bandwidth_source": "Apple spec sheet for this chip" if bw else None,
            "reason": f"torch {torch.__version__} with MPS (mlx not available)",
        }, ""
    except Exception as e:  # noqa: BLE001
        return None, f"torch MPS probe failed ({_first_line(e)})"


def usable_memory(backend: str, total: int, working_set: int | None = None,
                  memory_limit_bytes: int | None = None) -> tuple[int, str]:
    """(usable bytes, how): total minus the `RESERVE` for the OS, capped by Metal's working set and the limit."""
    kind = "unified" if backend in UNIFIED else "discrete" if backend in DISCRETE else "cpu"
    floor, frac = RESERVE[kind]
    reserve = max(floor, math.ceil(frac * total))
    usable = max(0, total - reserve)
    how = f"{reserve / GiB:.1f} GiB kept for the OS and other apps (max({floor / GiB:g} GiB, {frac:.0%}))"
    if working_set is not None and 0 < working_set < usable:
        usable = working_set
        how += "; capped by Metal's recommended working set"
    if memory_limit_bytes is not None and memory_limit_bytes < usable:
        usable = memory_limit_bytes
        how += f"; capped by --memory-limit {memory_limit_bytes / GiB:g} GiB"
    return usable, how


def _limit_bytes(memory_limit_gb: float | None) -> int | None:
    if memory_limit_gb is None:
        return None
    if isinstance(memory_limit_gb, bool) or not isinstance(memory_limit_gb, (int, float)) \
            or not math.isfinite(memory_limit_gb) or memory_limit_gb <= 0 or memory_limit_gb > 1 << 20:
        raise SwarmError(f"memory limit must be a positive number of GB, got {memory_limit_gb!r}")
    return int(memory_limit_gb * GiB)


def detect(memory_limit_gb: float | None = None) -> HardwareProfile:
    """This machine's backend, device, memory and tier. Never raises for hardware reasons.

    `memory_limit_gb` (GiB) caps the usable memory (SwarmError if it is not a positive number).
    """
    limit = _limit_bytes(memory_limit_gb)
    tried: list[str] = []
    found: dict | None = None
    torch, why = _import("torch")
    if torch is None:
        tried.append(why)
    else:
        found, why = _probe_cuda(torch)
        if found is None:
            tried.append(why)
    if found is None:
        found, why = _probe_mlx()
        if found is None:
            tried.append(why)
    if found is None and torch is not None:
        found, why = _probe_mps(torch)
        if found is None:
            tried.append(why)
    if found is None:
        total, where = _system_memory()
        found = {"backend": "cpu", "device": _cpu_name(), "total": total, "bandwidth": None,
                 "bandwidth_source": None, "reason": "no accelerator: " + "; ".join(tried)}
        if where != "physical memory":
            found["reason"] += f" (memory: {where})"
    elif tried:
        found["reason"] += " [" + "; ".join(tried) + "]"
    unusable = next((w for w in tried if "not viable" in w), None)
    usable, how = usable_memory(found["backend"], found["total"], found.get("working_set"), limit)
    return HardwareProfile(
        backend=found["backend"], backend_reason=found["reason"], device=found["device"],
        memory_total_bytes=int(found["total"]), memory_usable_bytes=int(usable), memory_reason=how,
        memory_bandwidth_bytes_per_s=found.get("bandwidth"), bandwidth_source=found.get("bandwidth_source"),
        unified_memory=found["backend"] in UNIFIED, tier=tier_for(found["backend"], usable), unusable_gpu=unusable,
    )


def with_memory_limit(hw: HardwareProfile, memory_limit_gb: float | None) -> HardwareProfile:
    """The same machine with its usable memory capped (tier re-derived)."""
    limit = _limit_bytes(memory_limit_gb)
    if limit is None or limit >= hw.memory_usable_bytes:
        return hw
    return replace(hw, memory_usable_bytes=limit, tier=tier_for(hw.backend, limit),
                   memory_reason=hw.memory_reason + f"; capped by --memory-limit {limit / GiB:g} GiB")


#: glibc's M_MMAP_THRESHOLD for `tune_allocator`: glibc's own initial value, frozen.
MMAP_THRESHOLD_BYTES = 128 * 1024


def tune_allocator(threshold: int = MMAP_THRESHOLD_BYTES) -> str:
    """Make CPU training's resident memory match what it allocates; returns what was done.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; after that,
    activation-sized tensors come from the heap, and the freed ones stay resident between the
    tensors autograd keeps. Measured on LoRA steps of 10M-150M-param models: peak RSS 1.3-1.7x
    the live bytes, different from run to run. Pinning the threshold (mallopt M_MMAP_THRESHOLD,
    which also turns the adjustment off) gives every tensor >= `threshold` back to the OS when
    freed, and peak RSS then matches swarm.memory's estimate (tests/test_memory_measured.py).

    The price is page faults: on a 2-core x86 box a 150M-param step took ~10x the system time
    (about +35-50% CPU time in all). So call it where memory is the constraint (a memory-capped
    peer, a small machine), not by default where memory is plentiful. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return "allocator left as is (not Linux/glibc)"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(-3, int(threshold)) != 1:  # M_MMAP_THRESHOLD
            return "allocator left as is (mallopt refused)"
    except (OSError, AttributeError) as e:
        return f"allocator left as is ({_first_line(e)})"
    return f"glibc mmap threshold pinned at {threshold // 1024} KiB (freed tensors go back to the OS)"


# ---------------------------------------------------------------------------------------- CLI


def fits_table(hw: HardwareProfile, seq_len: int, lora_r: int, targets, sizes=None) -> list[dict]:
    """For each size x method: fits, the largest micro-batch, the predicted peak at micro-batch 1."""
    from swarm.memory import METHODS, NAMED_SHAPES, TABLE_SIZES, default_dtype, estimate, max_micro_batch

    dtype = default_dtype(hw.backend)
    rows = []
    for size in sizes or TABLE_SIZES:
        shape = NAMED_SHAPES[size]
        for method in METHODS:
            kw = dict(method=method, lora_r=lora_r, lora_targets=targets, seq_len=seq_len, dtype=dtype, backend=hw.backend)
            mb = max_micro_batch(hw.memory_usable_bytes, shape, **kw)
            rows.append({"params": shape.param_count(), "name": size, "method": method, "fits": mb > 0,
                         "max_micro_batch": mb, "estimate_bytes": estimate(shape, micro_batch=1, **kw).total})
    return rows


def precision_table(hw: HardwareProfile, seq_len: int, lora_r: int, targets, sizes=None) -> list[dict]:
    """One row per base precision (swarm.precision): whether this platform runs it and why, and per model
    size the largest micro-batch that fits (0: does not fit) with the base in that precision."""
    from swarm.memory import NAMED_SHAPES, TABLE_SIZES, max_micro_batch
    from swarm.precision import DTYPE, supported

    framework = "mlx" if hw.backend == "mlx" else "torch"
    rows = []
    for sup in supported(hw.backend, framework):
        row = {"precision": sup.precision, "runs": sup.ok, "reason": sup.reason, "max_micro_batch": {}}
        if sup.ok:
            for size in sizes or TABLE_SIZES:
                row["max_micro_batch"][size] = max_micro_batch(
                    hw.memory_usable_bytes, NAMED_SHAPES[size], method="qlora" if sup.precision == "nf4" else "lora",
                    lora_r=lora_r, lora_targets=targets, seq_len=seq_len, dtype=DTYPE[sup.precision], backend=hw.backend)
        rows.append(row)
    return rows


def breakdown(hw: HardwareProfile, shape, seq_len: int, micro_batch: int, lora_r: int, targets) -> dict:
    """The estimate for one model, per method, with what fits on this machine."""
    from swarm.memory import METHODS, default_dtype, estimate, max_micro_batch, normalize_targets

    dtype = default_dtype(hw.backend)
    methods = {}
    for method in METHODS:
        kw = dict(method=method, lora_r=lora_r, lora_targets=targets, seq_len=seq_len, dtype=dtype, backend=hw.backend)
        est = estimate(shape, micro_batch=micro_batch, **kw)
        mb = max_micro_batch(hw.memory_usable_bytes, shape, **kw)
        methods[method] = {**est.parts(), "fits": est.total <= hw.memory_usable_bytes, "max_micro_batch": mb}
    return {"params": shape.param_count(), "name": shape.name, "shape": asdict(shape), "dtype": dtype,
            "micro_batch": micro_batch, "seq_len": seq_len, "lora_r": lora_r,
            "lora_targets": list(normalize_targets(targets)), "methods": methods}


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from swarm.config import TrainConfig

    p = Parser(prog="python -m swarm.hardware", description="What is this machine, and what can it train?")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--memory-limit", type=_positive_float, metavar="GB", help="cap the memory the swarm may use, in GB of 2^30 bytes (how RAM is sold: a '16 GB' Mac has 16 GiB)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="PATH", help="local model directory: estimate breakdown for it")
    g.add_argument("--params", metavar="SIZE", help="model size such as 7B or 350M: estimate breakdown for it")
    p.add_argument("--seq-len", type=_positive_int, default=TrainConfig().seq_len, help="tokens per sequence (default: the run default)")
    p.add_argument("--micro-batch", type=_positive_int, default=1, help="micro-batch of the breakdown (default 1)")
    p.add_argument("--no-probe", action="store_true", help="do not measure throughput")
    return p


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def _human(report: dict, console) -> None:
    from rich.table import Table

    hw = report
    bw = hw["memory_bandwidth_bytes_per_s"]
    tput = hw["throughput_tokens_per_s"]
    console.print(f"[bold]backend[/]   {hw['backend']}  ({hw['backend_reason']})")
    console.print(f"[bold]device[/]    {hw['device']}")
    if hw.get("unusable_gpu"):
        console.print(f"[bold]gpu[/]       [yellow]{hw['unusable_gpu']}[/]")
    console.print(f"[bold]memory[/]    {_gb(hw['memory_usable_bytes'])} usable of {_gb(hw['memory_total_bytes'])}"
                  f"{' unified' if hw['unified_memory'] else ''}  ({hw['memory_reason']})")
    console.print("[bold]bandwidth[/] " + (f"{bw / 1e9:.0f} GB/s ({hw['bandwidth_source']})" if bw else "unknown (not knowable without a measurement)"))
    console.print("[bold]throughput[/] " + (f"{tput:,.0f} tokens/s LoRA step ({hw['throughput_note']})" if tput else hw["throughput_note"]))
    console.print(f"[bold]tier[/]      {hw['tier']}  ({TIERS[hw['tier']]})")
    if "methods" in report:
        b = report
        t = Table(title=f"{b['name'] or 'model'}: {b['params'] / 1e9:.2f}B params, micro-batch {b['micro_batch']} x {b['seq_len']} tokens, "
                        f"{b['dtype']}, LoRA r={b['lora_r']}")
        t.add_column("part")
        for m in b["methods"]:
            t.add_column(m, justify="right")
        for key, label in (("weights_bytes", "weights"), ("trainable_bytes", "trainable + grads + optimizer"),
                           ("activations_bytes", "activations"), ("overhead_bytes", "framework overhead"),
                           ("total_bytes", "total")):
            t.add_row(label, *(_gb(v[key]) for v in b["methods"].values()))
        t.add_row("fits here", *("yes" if v["fits"] else "no" for v in b["methods"].values()))
        t.add_row("largest micro-batch", *(str(v["max_micro_batch"]) for v in b["methods"].values()))
        console.print(t)
    else:
        t = Table(title=f"What fits in {_gb(hw['memory_usable_bytes'])} ({hw['dtype']}, {hw['seq_len']} tokens, LoRA r={hw['lora_r']}): "
                        "largest micro-batch, or the memory micro-batch 1 needs")
        t.add_column("model")
        methods = list(dict.fromkeys(r["method"] for r in hw["fits"]))
        for m in methods:
            t.add_column({"qlora": "QLoRA", "lora": "LoRA", "full": "full fine-tune"}[m], justify="right")
        for name in dict.fromkeys(r["name"] for r in hw["fits"]):
            cells = []
            for m in methods:
                r = next(x for x in hw["fits"] if x["name"] == name and x["method"] == m)
                cells.append(f"[green]mb {r['max_micro_batch']}[/]" if r["fits"] else f"[red]no[/] (needs {_gb(r['estimate_bytes'])})")
            t.add_row(name, *cells)
        console.print(t)
        if hw["backend"] in ("cpu", "mps") and not any(r["precision"] == "nf4" and r["runs"] for r in report.get("precisions", [])):
            console.print("QLoRA needs 4-bit training kernels (bitsandbytes on CUDA/ROCm, or MLX): not on this backend.")
    rows = report.get("precisions") or []
    runs = [r for r in rows if r["runs"]]
    if runs:
        t = Table(title="LoRA per base precision this platform runs (--precision): largest micro-batch")
        t.add_column("precision")
        sizes = list(runs[0]["max_micro_batch"])
        for size in sizes:
            t.add_column(size, justify="right")
        t.add_column("why")
        for r in runs:
            t.add_row(r["precision"], *(f"[green]mb {r['max_micro_batch'][n]}[/]" if r["max_micro_batch"][n] else "[red]no[/]"
                                        for n in sizes), r["reason"])
        console.print(t)
    for r in rows:
        if not r["runs"]:
            console.print(f"{r['precision']}: not here: {r['reason']}")


def run_cli(argv: list[str] | None = None) -> dict:
    """Parse, detect, compute; returns the report (what --json prints). SwarmError on bad input."""
    from swarm.config import LoraConfig
    from swarm.memory import ModelShape, shape_for_params

    args = build_parser().parse_args(argv)
    shape = None
    if args.model:
        shape = ModelShape.from_dir(args.model)
    elif args.params:
        shape = shape_for_params(args.params)
    hw = detect(args.memory_limit)
    lora = LoraConfig()
    report = hw.as_dict()
    if args.no_probe:
        report["throughput_tokens_per_s"], report["throughput_note"] = None, "not measured (--no-probe)"
    else:
        from swarm.benchmark import probe_default_throughput

        report["throughput_tokens_per_s"], report["throughput_note"] = probe_default_throughput(hw.backend)
    if shape is not None:
        report.update(breakdown(hw, shape, args.seq_len, args.micro_batch, lora.r, lora.target_modules))
    else:
        from swarm.memory import default_dtype

        report.update({"dtype": default_dtype(hw.backend), "seq_len": args.seq_len, "lora_r": lora.r,
                       "fits": fits_table(hw, args.seq_len, lora.r, lora.target_modules)})
    report["precisions"] = precision_table(hw, args.seq_len, lora.r, lora.target_modules)
    report["_json"] = args.json
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        report = run_cli(argv)
    except SwarmError as e:
        print(f"swarm.hardware: error: {e}", file=sys.stderr)
        return 1
    as_json = report.pop("_json")
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        _human(report, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
