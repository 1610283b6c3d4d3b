// The TVM bundle's runner for a device without Python: TVM's runtime libraries alone
// (libtvm_runtime.so, libtvm_ffi.so) load a standalone module and run its "main" once.
//   run_module LIB.so INPUT.f32 D0,D1,... OUT_PREFIX
// INPUT.f32 holds the float32 input (C order) of the given shape; each output i of the module
// (one tensor, or a tuple of tensors) is written to OUT_PREFIX.i.f32 and its shape printed as
// "output i D0,D1,...". Exit 1 with one line on stderr when anything fails, 2 on a wrong command line.
// Build (headers from the apache-tvm-ffi wheel, libraries from it and the apache-tvm wheel):
//   g++ -std=c++17 -O2 -o run_module run_module.cc -I$FFI/include -L$TVM/lib -L$FFI/lib -ltvm_runtime -ltvm_ffi
// The Python runner (python -m stdeploy.runtime) does the same and more: hash checks, the spike
// check against samples.npz, the step module, timing. This one is what a C++ application embeds.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

// Host memory for the input tensor, 64-byte aligned as TVM's kernels expect.
struct HostAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes ? bytes : 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');) dims.push_back(std::stoll(part));
  return dims;
}

static void write_output(const Tensor& t, const std::string& prefix, int index) {
  size_t count = 1;
  std::string shape;
  const DLTensor* dl = t.GetDLTensorPtr();
  if (dl->device.device_type != kDLCPU || dl->dtype.code != kDLFloat || dl->dtype.bits != 32)
    throw std::runtime_error("output " + std::to_string(index) + " is not a float32 host tensor");
  for (int i = 0; i < dl->ndim; ++i) {
    count *= static_cast<size_t>(dl->shape[i]);
    shape += (i ? "," : "") + std::to_string(dl->shape[i]);
  }
  std::vector<float> data(count);
  std::memcpy(data.data(), static_cast<const char*>(dl->data) + dl->byte_offset, count * sizeof(float));
  std::ofstream out(prefix + "." + std::to_string(index) + ".f32", std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!out) throw std::runtime_error("cannot write " + prefix + "." + std::to_string(index) + ".f32");
  std::cout << "output " << index << " " << shape << "\n";
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: run_module LIB.so INPUT.f32 D0,D1,... OUT_PREFIX\n";
    return 2;
  }
  try {
    std::vector<int64_t> dims = parse_shape(argv[3]);
    size_t count = 1;
    for (int64_t d : dims) count *= static_cast<size_t>(d);
    std::vector<float> input(count);
    std::ifstream in(argv[2], std::ios::binary);
    in.read(reinterpret_cast<char*>(input.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (!in || in.peek() != EOF) throw std::runtime_error(std::string(argv[2]) + ": size does not match shape " + argv[3]);

    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    const int cpu = kDLCPU, pooled = 2;  // TVM's pooled allocator, as tvm.runtime.vm.VirtualMachine uses
    vm->GetFunction("vm_initialization").value()(cpu, 0, pooled);
    DLDevice dev{kDLCPU, 0};
    Tensor x = Tensor::FromNDAlloc(HostAlloc(), ffi::Shape(dims), DLDataType{kDLFloat, 32, 1}, dev);
    std::memcpy(x.data_ptr(), input.data(), count * sizeof(float));
    ffi::Any result = vm->GetFunction("main").value()(x);
    if (auto single = result.try_cast<Tensor>()) {
      write_output(*single, argv[4], 0);
    } else {
      ffi::Array<ffi::Any> outs = result.cast<ffi::Array<ffi::Any>>();
      for (size_t i = 0; i < outs.size(); ++i) write_output(outs[i].cast<Tensor>(), argv[4], static_cast<int>(i));
    }
  } catch (const std::exception& err) {
    std::string what = err.what();
    std::cerr << "run_module: " << what.substr(0, what.find('\n')) << "\n";
    return 1;
  }
  return 0;
}
