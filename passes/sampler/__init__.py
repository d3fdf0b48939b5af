"""The ``sampler`` pass: QEfficient's on-device sampling, appended to a retained-state graph.

* :mod:`.sampler_pass` (:class:`SamplerPass`) checks the graph, adds the
  sampler's inputs and outputs (the I/O contract is in its docstring);
* :mod:`.graph` builds the sampling subgraph, one function per step;
* :mod:`.ops` is the node builder (opset-aware reductions).
"""

from qgraph_passes.sampler.sampler_pass import SAMPLER_INPUTS, SamplerPass

__all__ = ["SAMPLER_INPUTS", "SamplerPass"]
