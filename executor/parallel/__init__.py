"""Tensor parallelism for the executor (one process per GPU, ``torch.distributed``).

* ``state``: the tensor-parallel group (``TPGroup``), process-group setup from the launcher's
  or torchrun's environment (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``), ``nccl`` on CUDA and
  ``gloo`` on the CPU, plus a ``gloo`` control group for broadcasting scheduler outputs.
* ``layers``: head / intermediate / vocabulary partitioning, the row-parallel linear (all-reduce
  after it), the vocab-parallel embedding and the gathered LM head.
* ``worker``: rank 0's ``TPDriverBackend`` (broadcasts each ``SchedulerOutput``, then runs its own
  shard) and the loop the other ranks run (``serve_worker``).
* ``launch``: ``python -m executor.parallel.launch --tp 2 -- -m experiments.bench_decode ...``
  and ``run_tensor_parallel(fn, tp, ...)`` for tests.

See ``docs/parallel.md``. Importing this package does not import torch.
"""
