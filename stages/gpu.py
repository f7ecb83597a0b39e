"""This worker's GPU through NVML (nvidia-ml-py): the figures its heartbeat carries.

The card is the one the stage's torch device names, resolved through CUDA_VISIBLE_DEVICES
(an index or a UUID, as `stagepool up` and `stagepool worker --gpu` set it) to NVML's own
handle, since NVML ignores that variable. On a CPU, without the package or without a driver,
there is no probe and the heartbeat carries no `gpu`.
"""

from __future__ import annotations

import logging
import os
import sys

from ..common.wire import GpuStats

log = logging.getLogger(__name__)

_MIB = 2**20


class GpuProbe:
    def __init__(self, nvml, handle, index: int, name: str):
        self._nvml = nvml
        self._handle = handle
        self.index = index
        self.name = name

    @classmethod
    def open(cls, device: str) -> GpuProbe | None:
        """The probe for a torch device string ("cuda", "cuda:1"); None where there is none."""
        if not device.startswith("cuda"):
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError, or NVMLError of any kind
            log.info("no GPU figures in the heartbeat (NVML: %s)", exc)
            return None
        try:
            ordinal = int(device.partition(":")[2] or 0)
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
                       if v.strip()]
            entry = visible[ordinal] if visible else str(ordinal)
            if entry.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
            index = pynvml.nvmlDeviceGetIndex(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        except (pynvml.NVMLError, IndexError, ValueError) as exc:
            log.warning("cannot find %s's card in NVML: %s", device, exc)
            return None
        return cls(pynvml, handle, index, name if isinstance(name, str) else name.decode())

    def sample(self) -> GpuStats | None:
        nvml = self._nvml
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except nvml.NVMLError as exc:
            log.debug("NVML sample failed: %s", exc)
            return None
        return GpuStats(index=self.index, name=self.name, memory_used_mib=memory.used / _MIB,
                        memory_total_mib=memory.total / _MIB, utilization_pct=float(utilization),
                        process_reserved_mib=_torch_reserved_mib())


def _torch_reserved_mib() -> float:
    """What this process's torch allocator holds on its GPU; 0 before torch used CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0.0
    return torch.cuda.memory_reserved() / _MIB
