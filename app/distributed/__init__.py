"""Servables that span hosts: one JAX device mesh over several processes.

The main host (``mserve start --distributed-address HOST:PORT --hosts N``) runs the
front door as always; its sharded ``jax_function`` model is a `runtime.DistributedRuntime`
that hands each batch to the JAX processes of N hosts (`coordinator`, turned on by
`serving.start_group`). On every host an agent (``mserve agent``, `agent`) registers
with the main host, beats, and runs the host's JAX process (`worker`), which joins the
others with ``jax.distributed`` and holds only its slices of the weights (`shards`).
`links` is the wire between them; `mindspore_api` is MindSpore Serving's
``distributed`` API over all this, with its model file (`model_module`).
See docs/distributed.md.
"""
