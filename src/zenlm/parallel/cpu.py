"""CPU shims for megatron-core's tensor-parallel code, applied only when CUDA is absent.

Two things in megatron-core's tensor_parallel package assume a GPU (see
shared/notes/stack-probe.md):

1. The RNG tracker (tensor_parallel/random.py): `model_parallel_cuda_manual_seed` and
   `get_cuda_rng_tracker().fork()` read and write CUDA generator states. The shim swaps the
   tracker class for one that keeps CPU generator states, with the same names and semantics:
   `add(name, seed)` stores a generator state, `fork(name)` runs a block on that state and
   restores the caller's. (megatron's own `tensor_parallel.checkpoint` still needs CUDA: use
   torch.utils.checkpoint or deepspeed.checkpointing on CPU.)
2. `torch.cuda.current_device()` as the device of buffers allocated inside the sequence-parallel
   mappings (all-gather / reduce-scatter along the first dim) and the SP backward of the linear
   layers. The shim rebinds the name `torch` in those two modules only (mappings, layers) to a
   proxy whose `cuda.current_device()` is the CPU device; everything else falls through to torch.

`apply_cpu_shims()` is idempotent and does nothing when `torch.cuda.is_available()`;
`remove_cpu_shims()` restores megatron's originals (for tests).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

_ORIGINALS: dict[str, Any] = {}


class _CudaOnCpu:
    """torch.cuda with current_device() answering the CPU device."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")


class _TorchOnCpu(types.ModuleType):
    """The torch module, except that torch.cuda.current_device() is the CPU device."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    base = _ORIGINALS.get("CudaRNGStatesTracker", mrandom.CudaRNGStatesTracker)

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """megatron's CudaRNGStatesTracker, keeping CPU generator states instead."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            caller_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(caller_state)

    return CpuRNGStatesTracker


def cpu_shims_active() -> bool:
    return bool(_ORIGINALS)


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU if CUDA is absent; return whether the shims are active."""
    if torch.cuda.is_available():
        return False
    if _ORIGINALS:
        return True
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.tensor_parallel import random as mrandom

    _ORIGINALS["CudaRNGStatesTracker"] = mrandom.CudaRNGStatesTracker
    _ORIGINALS["mappings.torch"] = mappings.torch
    _ORIGINALS["layers.torch"] = layers.torch
    mrandom.CudaRNGStatesTracker = _cpu_tracker_class()
    # A tracker made before the shim holds CUDA states: start a fresh (CPU) one.
    mrandom.initialize_rng_tracker(force_reset=True)
    mappings.torch = _TorchOnCpu()
    layers.torch = _TorchOnCpu()
    return True


def remove_cpu_shims() -> None:
    """Undo apply_cpu_shims (tests only)."""
    if not _ORIGINALS:
        return
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = _ORIGINALS.pop("CudaRNGStatesTracker")
    mappings.torch = _ORIGINALS.pop("mappings.torch")
    layers.torch = _ORIGINALS.pop("layers.torch")
    mrandom.initialize_rng_tracker(force_reset=True)
