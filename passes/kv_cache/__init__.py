"""The ``kv-cache`` pass: a decoder graph gets its KV cache as explicit inputs and outputs.

* :mod:`.analysis` reads what the graph computes (layers, K/V heads, masks,
  positions) once, for every cache style and serving variant;
* :mod:`.positions` and :mod:`.probe` establish positions and masks by
  running the exporter's own subgraphs;
* :mod:`.cache_pass` (:class:`KVCachePass`) rewrites the graph into the
  retained-state or the concat form, with :mod:`.build` for the subgraphs it
  adds, :mod:`.ctx_scatter` for the device's CtxScatter op and :mod:`.files`
  for the device files beside the model.
"""

from qgraph_passes.kv_cache.cache_pass import KVCachePass

__all__ = ["KVCachePass"]
