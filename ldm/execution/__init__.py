"""How a model call is executed, independent of what it computes.

* :mod:`ldm.execution.core_pool`: core-sharded CPU execution (a pool of one-thread workers
  that run a batch's rows side by side; :class:`ShardedUNet`, :func:`run_split`).
* :mod:`ldm.execution.padding`: :class:`PaddedUNet`, a UNet call padded to a fixed batch
  size (bucketed shapes for compiled or graph-captured UNets).
"""
