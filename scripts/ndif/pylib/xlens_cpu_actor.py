"""NDIF 0.1.2 model actor for a CPU-only machine (the project's local test server).

ndif's stock actor places weights on the GPUs the controller assigned and calls torch.cuda.*
(synchronize, memory caps, placement checks) on load, after every request and when parking a
replica. With a CPU build of torch each of those raises. This actor keeps ndif's request
handling (deserialization, timeouts, cancellation, result upload) and replaces only the places
that touch CUDA. The controller still believes in one logical GPU (see env.sh); it is ignored.

Ray's workers import it by name (``actor_class: xlens_cpu_actor.CPUModelActor`` in the deploy
file): env.sh puts this folder on PYTHONPATH before Ray starts.
"""

from __future__ import annotations

import gc
import logging
import time

import ray
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

log = logging.getLogger("ndif.modeling")


class CPUDeployment(BaseModelDeployment):
    # parking HOT -> WARM moves weights GPU -> CPU: meaningless here, so the controller evicts
    CACHEABLE = False

    def load_from_disk(self) -> HuggingFaceModel:
        t0 = time.monotonic()
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype_name, **self.kwargs)
        model._module.requires_grad_(False).eval()
        log.info("loaded %s on the CPU in %.2f s", self.model_key, time.monotonic() - t0)
        return model

    async def to_cache(self) -> None:
        await self.cancel("preempted")
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUDeployment):
    """The Ray actor: restarted (and the model reloaded) if its process dies."""
