"""The ``lava`` target: an export's ``model.nir`` lowered to lava-nc processes and run on Lava's CPU
simulator (``Loihi2SimCfg``), in float32 (spike-exact) or Loihi-style fixed point.

One module per concern, lowest first; only :mod:`.processes` imports lava, and only inside the
worker subprocess:

* :mod:`.graph`: the NIR graph checked (every node the lowering cannot take, listed at once) and
  analysed (shapes, reshapes resolved, consumers);
* :mod:`.plan`: the plan, plain picklable data: process specs in creation order, latencies,
  the delay taps that align paths of different synaptic depth, the output sinks;
* :mod:`.lowering`: :func:`~.lowering.lower`, float mode; :mod:`.fixed_point`: fixed mode;
* :mod:`.standard`: the other lowering (``[lava] lowering = "standard"``): Lava's own processes
  only (Dense, Sparse, DelaySparse, LIFReset, RingBuffer) with Lava's float models, batch 1, samples
  streamed as the chip runs them;
* :mod:`.resources`: the Loihi 2 resource report of the standard lowering (neurons, synapses,
  synaptic memory, fan-in/out, cores, the first layer that does not fit) under ``[limits]``;
* :mod:`.processes`: our Lava processes and models, and the worker's serving loop;
* :mod:`.worker`: the parent's side of the worker subprocess (process groups, timeouts);
* :mod:`.mapping`: how the graph maps onto Loihi 2 cores under a profile's ``[limits]``;
* :mod:`.target`: :class:`~stdeploy.targets.lava.target.LavaTarget`, the registered target.
"""
