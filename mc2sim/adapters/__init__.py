"""Adapters: real third-party implementations of mc2sim's ops, for ``mc2sim check``.

Each adapter is a callable with the signature of an op of :mod:`mc2sim.ops` that maps
mc2sim's arguments to a library's fused op and its results back, so ``mc2sim check`` can
check and time the library's kernel against mc2sim's golden::

    mpiexec -n 2 mc2sim check llama70b_tp8_allgather --set scale=small \
        --impl mc2sim.adapters.symm_mem:fused_all_gather_matmul

Each has an ``unavailable(comm)`` probe: where the library, its device or the world size is
missing, ``check`` skips it with that one-line reason (exit status 4).

* :mod:`mc2sim.adapters.symm_mem`: PyTorch's symmetric-memory fused ops on CUDA GPUs
  (``torch.ops.symm_mem.fused_all_gather_matmul``, ``fused_matmul_reduce_scatter``).
* :mod:`mc2sim.adapters.torch_npu`: torch_npu's MC2 and quantised ops on Ascend NPUs
  (``npu_mm_all_reduce_base``, ``npu_gmm_alltoallv``, ``npu_alltoallv_gmm``,
  ``npu_quant_matmul`` and ``npu_weight_quant_batchmatmul`` each followed by an HCCL
  AllReduce, ``npu_incre_flash_attention``).

The adapters join the ranks of the mc2sim communicator they are given into a
``torch.distributed`` group of the library's backend (NCCL, HCCL), once per process
(:func:`mc2sim.adapters._dist.process_group`); nothing here is imported by mc2sim itself.
"""

__all__: list[str] = []
