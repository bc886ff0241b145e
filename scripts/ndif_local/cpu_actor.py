"""NDIF model actor that loads and runs on the CPU. Server side: it imports ray and ndif, which only the
server venv has, so the harness never imports it. ``start`` copies this file to
RUNDIR/shim/<stack.CPU_ACTOR_MODULE>.py (RUNDIR/shim is on the stack's PYTHONPATH), and the stack selects
it with NDIF_MODEL_IMPORT_PATH and, when deploying, ``actor_class``.

Why: the stock ndif 0.1.2 actor loads onto device=<gpu index>, calls torch.cuda (set_device, synchronize,
memory fractions) and checks that every tensor is on CUDA. Only loading, the GPU<->CPU cache moves and
cleanup change here; requests run stock.
"""

import gc
import logging
import time

import ray
from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED, BaseModelDeployment
from nnsight.modeling.huggingface import HuggingFaceModel

logger = logging.getLogger("ndif.modeling")


class CPUModelDeployment(BaseModelDeployment):
    def __init__(self, model_key, execution_timeout=None, gpu_mem_bytes_by_id=None, dtype="float32", **kwargs):
        # The controller hands over the fake GPU's memory map; a CPU actor owns no GPU.
        super().__init__(model_key, execution_timeout, {}, dtype, **kwargs)

    def load_from_disk(self):
        start = time.time()
        model = HuggingFaceModel.from_model_key(
            self.model_key, dispatch=True, dtype=self.dtype_name, device="cpu", **self.kwargs
        )
        model._module.requires_grad_(False)
        logger.info("Loaded %s on the CPU in %.2fs", self.model_key, time.time() - start)
        return model

    async def to_cache(self):
        # Nothing to move off a GPU: stop what runs and mark the replica cached.
        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id):
        self.cached = False

    def cleanup(self):
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=0, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    pass
