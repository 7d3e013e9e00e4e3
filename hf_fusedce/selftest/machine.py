"""What the selftest ran on: the device and its memory, the driver / CUDA or ROCm runtime, the library versions,
and on a GPU the row kernel's registers, spills and shared memory as Triton compiled it on this device."""
from __future__ import annotations

import platform

import torch

from ..bench.runner import _version, environment
from .report import Check

LIBRARIES = ("torch", "triton", "transformers", "trl", "peft", "accelerate", "liger_kernel", "cut_cross_entropy")


def machine_info(device: torch.device) -> dict:
    env = environment(device)
    info = {"device": env["device"], "platform": platform.platform(), "python": platform.python_version(),
            **{lib: _version(lib) for lib in LIBRARIES}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["runtime"] = (f"ROCm/HIP {torch.version.hip}, {getattr(props, 'gcnArchName', '')}" if torch.version.hip
                           else f"CUDA {torch.version.cuda}, sm_{props.major}{props.minor}")
        info["driver"] = _driver_version()
    else:
        from ..memory import _proc_kib_field
        total = _proc_kib_field("/proc/meminfo", "MemTotal")
        info["memory_gib"] = round(total / 2**30, 1) if total else None  # the field is read in bytes
        info["runtime"] = f"CPU, {torch.get_num_threads()} threads (no GPU: the torch path, Triton interpreted)"
        info["driver"] = None
    return info


def _driver_version() -> str | None:
    try:
        import pynvml  # noqa: PLC0415 - optional, part of many CUDA images
        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - not an NVIDIA machine, or no NVML: the runtime version is still recorded
        return None


def kernel_resources(device: torch.device) -> Check:
    """Runs the op once with the Triton backend in bf16 and reads every row-kernel variant Triton compiled here."""
    if device.type != "cuda":
        return Check("machine", "row kernel as compiled here", "skipped",
                     detail="no GPU: on CPU the kernel runs in Triton's interpreter (compiled resources: "
                            "python -m hf_fusedce.ops.cuda.aot / hf_fusedce.ops.cuda.hip)")
    from ..ops import fused_linear_cross_entropy
    from ..ops.ce.triton_impl import _ce_rows_kernel

    for vocab in (32000, 50257):  # rows aligned to 16 elements (prefetching) and not
        h = torch.randn(64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(vocab, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        fused_linear_cross_entropy(h, w, torch.randint(0, vocab, (64,), device=device), backend="triton").backward()
    torch.cuda.synchronize(device)
    figures = {}
    for cache in _ce_rows_kernel.device_caches.values():
        for kernel in cache[0].values():
            kernel._init_handles()  # loads the binary: registers and spills as the driver reports them
            figures[f"variant {len(figures)}"] = {"registers": kernel.n_regs, "spills": kernel.n_spills,
                                                  "shared_bytes": kernel.metadata.shared,
                                                  "warps": kernel.metadata.num_warps}
    spills = sum(f["spills"] for f in figures.values())
    return Check("machine", "row kernel as compiled here", "fail" if spills else "info", figures,
                 detail=f"{spills} spilled registers" if spills else "")
