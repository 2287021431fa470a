// XLA FFI custom calls into oneDNN for PyNET's convolutions on CPU (bokeh_jax/onednn.py).
//
// One layer kind only: 2-D convolution of a float32 NHWC input with an HWIO kernel, stride 1,
// no dilation, no groups, zero 'SAME' padding with an odd square kernel (K // 2 on every side).
//   DnnlConvForward(x [N, H, W, I], w [K, K, I, O]) -> y [N, H, W, O]
//   DnnlConvForwardBf16(x bf16 [N, H, W, I], w bf16 [K, K, I, O]) -> y float32 [N, H, W, O]
//     (bfloat16 products, float32 accumulation and result: rendering on CPUs with AVX512-BF16
//     or AMX, where oneDNN runs it several times faster than float32)
//   DnnlConvBackwardData(g [N, H, W, O], w [K, K, I, O]) -> dx [N, H, W, I]
//   DnnlConvBackwardWeights(x [N, H, W, I], g [N, H, W, O]) -> dw [K, K, I, O]
// Shapes that break these rules come back as an InvalidArgument error, never a crash.
//
// Primitives are created once per (operation, shape) and kept in a process-wide cache. They are
// immutable after creation, so one can run on several threads at once (pmap over host devices):
// every call uses its thread's own scratchpad (scratchpad_mode::user), weight buffer and stream,
// kept from call to call so that no call allocates (and page-faults) fresh memory.

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum class Op { kForward, kBackwardData, kBackwardWeights, kForwardBf16 };

struct Shape {
  int64_t n, h, w, in, out, k;
  auto key() const { return std::make_tuple(n, h, w, in, out, k); }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// A primitive and what a call needs besides the user's buffers. The primitive picks its own
// weight layout (format_tag::any, usually blocked); `weights_reorder` converts between it and
// HWIO (HWIO -> blocked before forward and backward-data, blocked -> HWIO after backward-weights)
// and is null when the primitive takes HWIO as it is.
struct Entry {
  dnnl::primitive primitive;
  memory::desc data_in, data_out;  // NHWC input-side and output-side activations
  memory::desc user_weights, weights;
  std::unique_ptr<dnnl::reorder> weights_reorder;
  memory::desc scratchpad, reorder_scratchpad;
};

std::mutex cache_mutex;
std::map<std::tuple<Op, std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>>,
         std::shared_ptr<const Entry>>
    cache;

std::shared_ptr<const Entry> MakeEntry(Op op, const Shape& s) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::dims strides{1, 1}, pad{s.k / 2, s.k / 2};
  const auto f32 = memory::data_type::f32;
  // Input and weights in bfloat16 for kForwardBf16; the result is float32 in every case.
  const auto in_type = op == Op::kForwardBf16 ? memory::data_type::bf16 : f32;
  memory::desc src({s.n, s.in, s.h, s.w}, in_type, Tag::nhwc);
  memory::desc dst({s.n, s.out, s.h, s.w}, f32, Tag::nhwc);
  memory::desc user_weights({s.out, s.in, s.k, s.k}, in_type, Tag::hwio);
  memory::desc any_weights({s.out, s.in, s.k, s.k}, in_type, Tag::any);
  const auto direct = dnnl::algorithm::convolution_direct;
  // Inference only for bfloat16 (no backward primitive is built from it).
  const auto prop = op == Op::kForwardBf16 ? dnnl::prop_kind::forward_inference
                                           : dnnl::prop_kind::forward_training;
  dnnl::convolution_forward::primitive_desc forward(Engine(), prop, direct, src, any_weights, dst,
                                                    strides, pad, pad, attr);
  auto entry = std::make_shared<Entry>();
  entry->user_weights = user_weights;
  if (op == Op::kForward || op == Op::kForwardBf16) {
    // oneDNN's brgemm forward kernels also read HWIO weights as they are (TF asks for that too),
    // which saves a weight reorder per call; any other kernel gets its preferred layout.
    dnnl::convolution_forward::primitive_desc pd = forward;
    dnnl::convolution_forward::primitive_desc hwio(Engine(), prop, direct, src, user_weights,
                                                   dst, strides, pad, pad, attr, true);
    if (hwio && std::string(hwio.impl_info_str()).rfind("brg", 0) == 0) pd = hwio;
    entry->primitive = dnnl::convolution_forward(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
    entry->data_in = src, entry->data_out = dst;
  } else if (op == Op::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), direct, src, any_weights, dst,
                                                       strides, pad, pad, forward, attr);
    entry->primitive = dnnl::convolution_backward_data(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
    entry->data_in = dst, entry->data_out = src;
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), direct, src, any_weights, dst,
                                                          strides, pad, pad, forward, attr);
    entry->primitive = dnnl::convolution_backward_weights(pd);
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad = pd.scratchpad_desc();
    entry->data_in = src, entry->data_out = dst;
  }
  if (entry->weights != user_weights) {
    const bool to_user = op == Op::kBackwardWeights;
    dnnl::reorder::primitive_desc pd(Engine(), to_user ? entry->weights : user_weights, Engine(),
                                     to_user ? user_weights : entry->weights, attr);
    entry->weights_reorder = std::make_unique<dnnl::reorder>(pd);
    entry->reorder_scratchpad = pd.scratchpad_desc();
  }
  return entry;
}

std::shared_ptr<const Entry> GetEntry(Op op, const Shape& s) {
  const auto key = std::make_tuple(op, s.key());
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  // Created outside the lock (it can take milliseconds); a concurrent twin is harmless.
  auto entry = MakeEntry(op, s);
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(key, std::move(entry)).first->second;
}

// A buffer of this thread's, grown to `desc`'s size when needed, as oneDNN memory of `desc`.
memory ThreadBuffer(int slot, const memory::desc& desc) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    size_t size = 0;
  };
  thread_local Buffer buffers[3];
  Buffer& b = buffers[slot];
  const size_t size = desc.get_size();
  if (size > b.size) {
    b.size = (size + 63) / 64 * 64;
    b.data.reset(static_cast<char*>(std::aligned_alloc(64, b.size)));
    if (!b.data) throw std::bad_alloc();
  }
  return memory(desc, Engine(), size ? b.data.get() : nullptr);
}

// Runs one cached primitive. `data_in` / `data_out` are the activation buffers in the entry's
// order, `weights` the user's HWIO kernel (read, or written for backward-weights).
void Execute(Op op, const Shape& s, void* data_in, void* data_out, void* weights) {
  std::shared_ptr<const Entry> e = GetEntry(op, s);
  dnnl::engine& engine = Engine();
  dnnl::stream& stream = ThreadStream();
  memory in(e->data_in, engine, data_in), out(e->data_out, engine, data_out);
  memory user_weights(e->user_weights, engine, weights);
  memory primitive_weights = user_weights;
  if (e->weights_reorder) primitive_weights = ThreadBuffer(0, e->weights);
  auto run_reorder = [&](memory& from, memory& to) {
    memory scratchpad = ThreadBuffer(1, e->reorder_scratchpad);
    e->weights_reorder->execute(
        stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  };
  memory scratchpad = ThreadBuffer(2, e->scratchpad);
  if (op == Op::kForward || op == Op::kForwardBf16) {
    if (e->weights_reorder) run_reorder(user_weights, primitive_weights);
    e->primitive.execute(stream, {{DNNL_ARG_SRC, in},
                                  {DNNL_ARG_WEIGHTS, primitive_weights},
                                  {DNNL_ARG_DST, out},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (op == Op::kBackwardData) {
    if (e->weights_reorder) run_reorder(user_weights, primitive_weights);
    e->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, in},
                                  {DNNL_ARG_WEIGHTS, primitive_weights},
                                  {DNNL_ARG_DIFF_SRC, out},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    e->primitive.execute(stream, {{DNNL_ARG_SRC, in},
                                  {DNNL_ARG_DIFF_DST, out},
                                  {DNNL_ARG_DIFF_WEIGHTS, primitive_weights},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (e->weights_reorder) run_reorder(primitive_weights, user_weights);
  }
  stream.wait();
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string text = "[";
  for (size_t i = 0; i < d.size(); ++i) text += (i ? ", " : "") + std::to_string(d[i]);
  return text + "]";
}

// Checks the shapes of one call: `a` and `b` are the two operands, `r` the result, named as in
// the comment at the top. Returns the common Shape or an InvalidArgument error.
ffi::ErrorOr<Shape> CheckShapes(Op op, ffi::Span<const int64_t> a, ffi::Span<const int64_t> b,
                                ffi::Span<const int64_t> r) {
  static const char* names[] = {"DnnlConvForward(x, w) -> y", "DnnlConvBackwardData(g, w) -> dx",
                                "DnnlConvBackwardWeights(x, g) -> dw",
                                "DnnlConvForwardBf16(x, w) -> y"};
  const char* name = names[static_cast<int>(op)];
  auto fail = [&](const std::string& why) -> ffi::ErrorOr<Shape> {
    return ffi::Unexpected<ffi::Error>(
        ffi::Error::InvalidArgument(std::string(name) + ": " + why + "; got operands " + Dims(a) +
                                    ", " + Dims(b) + " and result " + Dims(r)));
  };
  if (a.size() != 4 || b.size() != 4 || r.size() != 4) return fail("every array must be rank 4");
  // Activations x, the result-side activations, and the kernel, whatever the operation.
  ffi::Span<const int64_t> x = op == Op::kBackwardData ? r : a;
  const bool forward = op == Op::kForward || op == Op::kForwardBf16;
  ffi::Span<const int64_t> y = forward ? r : (op == Op::kBackwardData ? a : b);
  ffi::Span<const int64_t> w = op == Op::kBackwardWeights ? r : b;
  Shape s{x[0], x[1], x[2], x[3], y[3], w[0]};
  for (int i = 0; i < 4; ++i) {
    if (x[i] <= 0 || y[i] <= 0 || w[i] <= 0) return fail("every dimension must be positive");
  }
  if (w[0] != w[1] || w[0] % 2 == 0) return fail("the kernel must be square with an odd side");
  if (y[0] != x[0] || y[1] != x[1] || y[2] != x[2]) {
    return fail("input and output must have the same batch, height and width");
  }
  if (w[2] != x[3] || w[3] != y[3]) {
    return fail("the kernel must be [K, K, input channels, output channels]");
  }
  return s;
}

// One call: checks the shapes, then runs the primitive on the buffers, named as in CheckShapes.
template <ffi::DataType T>
ffi::Error Run(Op op, ffi::Buffer<T>& a, ffi::Buffer<T>& b, ffi::ResultBuffer<ffi::F32>& r) {
  ffi::ErrorOr<Shape> shape = CheckShapes(op, a.dimensions(), b.dimensions(), r->dimensions());
  if (shape.has_error()) return shape.error();
  void* x = op == Op::kBackwardData ? r->untyped_data() : a.untyped_data();
  const bool forward = op == Op::kForward || op == Op::kForwardBf16;
  void* y = forward ? r->untyped_data()
                               : (op == Op::kBackwardData ? a.untyped_data() : b.untyped_data());
  void* w = op == Op::kBackwardWeights ? r->untyped_data() : b.untyped_data();
  try {
    if (op == Op::kBackwardData) {
      Execute(op, shape.value(), y, x, w);
    } else {
      Execute(op, shape.value(), x, y, w);
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  return Run(Op::kForward, x, w, y);
}

ffi::Error ForwardBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  return Run(Op::kForwardBf16, x, w, y);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx) {
  return Run(Op::kBackwardData, g, w, dx);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dw) {
  return Run(Op::kBackwardWeights, x, g, dw);
}

}  // namespace

#define BIND_F32_2_TO_1                                                    \
  ffi::Ffi::Bind()                                                         \
      .Arg<ffi::Buffer<ffi::F32>>()                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                        \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvForward, Forward, BIND_F32_2_TO_1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvForwardBf16, ForwardBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvBackwardData, BackwardData, BIND_F32_2_TO_1);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DnnlConvBackwardWeights, BackwardWeights, BIND_F32_2_TO_1);
