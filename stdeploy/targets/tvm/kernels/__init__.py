"""Kernels the ``tvm`` target runs outside TVM's code generator, and the graph rewrite that routes
Relax operators to them. TVM's CPU codegen gives ``matmul`` and ``conv2d`` no schedule unless they
are tuned, and the apache-tvm 0.27 wheel has no BLAS/DNNL dispatch, so these carry the heavy
operators of a spiking transformer on the CPU:

* :mod:`.blas`: matmul and im2col convolution with numpy's BLAS on zero-copy views of TVM buffers;
* :mod:`.spike`: accumulate-only gather kernels (TIR) for inputs that are mostly zeros (spikes),
  switching to BLAS above a measured density;
* :mod:`.skipzero`: kernels (TIR) that skip zero inputs and zero weights, for pruned layers fed
  spikes, chosen per call against the gather kernel and BLAS;
* :mod:`.lif`: the LIF recurrences, all T steps of a population in one loop (membrane in
  registers, bias add fused in), bit-identical to the graph's arithmetic;
* :mod:`.event`: kernels for pruned layers compiled into the module (event-driven linear layers,
  weight-stationary convolutions; also the one-channel stem convolution), bit-identical to the
  skip-zero kernels, routed by :func:`~.event.route_event_kernels` on the CPU path;
* :mod:`.eventlif`: an :mod:`.event` kernel and the LIF population it feeds in one kernel (the
  pre-activation never written), optionally with the max pool the spikes feed or, for an MLP, the
  second linear (fused by :func:`~.lif.fuse_lif_recurrences`), bit-identical to the separate kernels;
* :mod:`.pool`: max pooling as a hand-scheduled TIR kernel (:func:`~.pool.route_max_pools`);
* :mod:`.sparse`: a CSR kernel (TIR, CPU and CUDA schedules) for pruned constant weights;
* :mod:`.routing`: :func:`~.routing.route_to_external_kernels`, the Relax rewrite that sends
  constant-weight matmuls and NCHW convolutions to the BLAS or spike kernels.
"""
