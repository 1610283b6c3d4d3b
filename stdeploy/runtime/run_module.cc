// The TVM bundle's runner for a device without Python: TVM's runtime libraries alone
// (libtvm_runtime.so, libtvm_ffi.so) load a standalone module and run its "main" once.
//   run_module LIB.so INPUT.f32 D0,D1,... OUT_PREFIX [cpu|cuda]
// INPUT.f32 holds the float32 input (C order) of the given shape; each output i of the module
// (one tensor, or a tuple of tensors) is written to OUT_PREFIX.i.f32 and its shape printed as
// "output i D0,D1,...". Exit 1 with one line on stderr when anything fails, 2 on a wrong command line.
// "cuda" (a CUDA bundle's modules) runs on GPU 0 and nowhere else: TVM's CUDA runtime library
// (libtvm_runtime_cuda.so, which needs the NVIDIA driver's libcuda.so.1 and CUDA 13's
// libcudart.so.13) is opened from the loader path, and where it does not load or no GPU is
// visible the runner exits 1 with one line saying which (no CPU fallback); else it first prints
// "device cuda:0 NAME" (the GPU that ran). The input is copied to the GPU, the outputs back.
// Build (headers from the apache-tvm-ffi wheel, libraries from it and the apache-tvm wheel):
//   g++ -std=c++17 -O2 -o run_module run_module.cc -I$FFI/include -L$TVM/lib -L$FFI/lib -ltvm_runtime -ltvm_ffi -ldl
// The Python runner (python -m stdeploy.runtime) does the same and more: hash checks, the spike
// check against samples.npz, the step module, timing. This one is what a C++ application embeds.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>

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

static ffi::Function global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) throw std::runtime_error(std::string("TVM's runtime has no function ") + name);
  return *f;
}

// The float32 host data `input` as a new tensor on the GPU (TVM's runtime copies and synchronises).
static Tensor to_gpu(const std::vector<float>& input, const std::vector<int64_t>& dims) {
  DLDevice gpu{kDLCUDA, 0};
  Tensor x = global("runtime.TVMTensorAllocWithScope")(ffi::Shape(dims), DLDataType{kDLFloat, 32, 1}, gpu,
                                                       ffi::Optional<ffi::String>())
                 .cast<Tensor>();
  global("runtime.TVMTensorCopyFromBytes")(x, static_cast<void*>(const_cast<float*>(input.data())),
                                           static_cast<int64_t>(input.size() * sizeof(float)));
  return x;
}

// Opens TVM's CUDA runtime and checks GPU 0 exists; prints and returns its name.
static std::string open_cuda() {
  if (dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    throw std::runtime_error(std::string("cuda: TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load: ") +
                             (why ? why : "?") + " (it needs the NVIDIA driver and CUDA 13's libcudart.so.13); no CPU fallback");
  }
  const int cuda = kDLCUDA, exist = 0, name = 5;  // TVM's DeviceAttrKind: kExist, kDeviceName
  if (global("runtime.GetDeviceAttr")(cuda, 0, exist).cast<int64_t>() == 0)
    throw std::runtime_error("cuda: no CUDA GPU is visible (TVM's CUDA runtime loaded; device cuda:0 does not exist); no CPU fallback");
  std::string gpu = global("runtime.GetDeviceAttr")(cuda, 0, name).cast<ffi::String>();
  std::cout << "device cuda:0 " << gpu << "\n";
  return gpu;
}

static void write_output(const Tensor& t, const std::string& prefix, int index) {
  size_t count = 1;
  std::string shape;
  const DLTensor* dl = t.GetDLTensorPtr();
  const bool host = dl->device.device_type == kDLCPU, gpu = dl->device.device_type == kDLCUDA;
  if (!(host || gpu) || dl->dtype.code != kDLFloat || dl->dtype.bits != 32)
    throw std::runtime_error("output " + std::to_string(index) + " is not a float32 host or GPU tensor");
  for (int i = 0; i < dl->ndim; ++i) {
    count *= static_cast<size_t>(dl->shape[i]);
    shape += (i ? "," : "") + std::to_string(dl->shape[i]);
  }
  std::vector<float> data(count);
  if (host) {
    std::memcpy(data.data(), static_cast<const char*>(dl->data) + dl->byte_offset, count * sizeof(float));
  } else {  // a GPU output: TVM's runtime copies it back and synchronises
    global("runtime.TVMTensorCopyToBytes")(t, static_cast<void*>(data.data()), static_cast<int64_t>(count * sizeof(float)));
  }
  std::ofstream out(prefix + "." + std::to_string(index) + ".f32", std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (!out) throw std::runtime_error("cannot write " + prefix + "." + std::to_string(index) + ".f32");
  std::cout << "output " << index << " " << shape << "\n";
}

int main(int argc, char** argv) {
  std::string where = argc == 6 ? argv[5] : "cpu";
  if ((argc != 5 && argc != 6) || (where != "cpu" && where != "cuda")) {
    std::cerr << "usage: run_module LIB.so INPUT.f32 D0,D1,... OUT_PREFIX [cpu|cuda]\n";
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

    if (where == "cuda") open_cuda();  // before loading: the library's CUDA module needs its loader
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    const int cpu = kDLCPU, cuda = kDLCUDA, pooled = 2;  // TVM's pooled allocator, as tvm.runtime.vm.VirtualMachine uses
    if (where == "cuda") {
      vm->GetFunction("vm_initialization").value()(cuda, 0, pooled, cpu, 0, pooled);  // the GPU, then the host
    } else {
      vm->GetFunction("vm_initialization").value()(cpu, 0, pooled);
    }
    DLDevice dev{kDLCPU, 0};
    Tensor x = Tensor::FromNDAlloc(HostAlloc(), ffi::Shape(dims), DLDataType{kDLFloat, 32, 1}, dev);
    std::memcpy(x.data_ptr(), input.data(), count * sizeof(float));
    if (where == "cuda") x = to_gpu(input, dims);
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
