"""The ``tvm`` target: Apache TVM (0.27, Relax) compiling an export's ``model.onnx`` for a CPU or a
CUDA device profile. One module per concern, lowest first; nothing here imports ``tvm`` at module
level (it is imported on first use through :func:`stdeploy.targets.tvm.sdk.load_tvm`):

* :mod:`.sdk`: the one import of apache-tvm (with the install hint) and whether it is runtime-only;
* :mod:`.host`: the host CPU as LLVM names it and the llvm target dict of a cpu profile;
* :mod:`.frontend`: ``model.onnx`` checked and imported with TVM's Relax ONNX frontend;
* :mod:`.kernels`: kernels outside TVM's codegen (BLAS, spike gather, sparse CSR) and the graph
  rewrite that routes matmuls and convolutions to them;
* :mod:`.database`: MetaSchedule tuning databases (where they live, reading, applying);
* :mod:`.cpu`: the CPU module build and its runnable; :mod:`.tuning`: ``stdeploy tune``;
* :mod:`.cuda_standin_driver`: a stand-in ``libcuda.so.1`` built so CUDA modules compile
  without a GPU; :mod:`.cuda_artifacts`: written CUDA libraries and their sidecar;
  :mod:`.cuda`: the CUDA build and its runnable;
* :mod:`.target`: :class:`~stdeploy.targets.tvm.target.TVMTarget`, the registered target.
"""
