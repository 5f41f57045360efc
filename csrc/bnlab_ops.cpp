// bnlab's kernels as torch operators: torch.ops.bnlab.train_forward (functional, for graphs
// and autograd), .train_forward_update (eager: the running update and in-place output in the
// same pass), .backward, .eval_forward and .empty_like.
//
// Built against torch's stable ABI (torch/csrc/stable, STABLE_TORCH_LIBRARY), so the shared
// object keeps working with later torch releases without a rebuild. Each operator takes
// tensors, checks them here (dtype, device, shape, strides: a std::runtime_error, which
// Python sees as RuntimeError, never a read out of bounds), allocates its outputs and calls
// the C kernels of bnlab_kernels.c with their data pointers. The kernels are registered for
// the CPU dispatch key; a CUDA kernel would be one more STABLE_TORCH_LIBRARY_IMPL block for
// the same schemas. Autograd formulas and fake (meta) implementations are registered from
// Python (bnlab/kernels/library.py), once per operator.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

extern "C" {
int bnlab_train_fwd(int dtype, int nhwc, const void* x, void* y, int64_t N, int64_t C,
                    int64_t S, const void* w, const void* b, void* mean, void* var,
                    void* invstd, void* delta, void* thr, double eps, int act, double slope,
                    void* rm, void* rv, double factor, double unbias, int nt);
int bnlab_eval_fwd(int dtype, int nhwc, const void* x, void* y, int64_t N, int64_t C,
                   int64_t S, const void* mean, const void* invstd, const void* w,
                   const void* b, int act, double slope, double eps, int nt);
int bnlab_backward(int dtype, int nhwc, const void* dy, const void* x, void* dx, int64_t N,
                   int64_t C, int64_t S, const void* mean, const void* invstd,
                   const void* delta, const void* thr, const void* w, const void* b,
                   const void* gmean, const void* gvar, void* dw, void* db, double eps,
                   int act, double slope, int train, int nt);
int bnlab_masked_forward(int dtype, int rows, const void* x, const uint8_t* m, void* y, int64_t N,
                         int64_t C, int64_t L, const void* w, const void* b, double eps,
                         void* mean, void* var, void* delta, int nt);
int bnlab_masked_backward(int dtype, int rows, const void* dy, const void* x, const uint8_t* m,
                          void* dx, int64_t N, int64_t C, int64_t L, const void* mean,
                          const void* delta, const void* invstd, const void* w, void* sdy,
                          void* sdx, int nt);
int bnlab_masked_affine(int dtype, int rows, const void* dy, const void* x, const uint8_t* m,
                        void* out, int64_t N, int64_t C, int64_t L, const void* mean,
                        const void* delta, const void* var, const void* w, const void* b,
                        const void* mdy, const void* mdx, double eps, int nt);
void* bnlab_buffer_take(size_t n, size_t* cap);
void bnlab_buffer_give(void* ptr, size_t cap);
}

namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kActLeaky = 2;     // identity 0, relu 1, leaky_relu 2
constexpr int64_t kActInvLeaky = 3;  // backward only: "x" is leaky_relu's output
// outputs of at least this many bytes live in the kernels' huge-page buffers (bn_buffers.h)
constexpr int64_t kBufferMinBytes = int64_t(1) << 20;

struct Layout {
  int nhwc;
  int64_t n, c, s;
};

// 0 float32, 1 float64, 2 bfloat16 (with float32 (C,) tensors: the autocast case)
int dtype_code(const Tensor& x) {
  ScalarType t = x.scalar_type();
  return t == ScalarType::Double ? 1 : t == ScalarType::BFloat16 ? 2 : 0;
}

// The dtype of the (C,) tensors beside x: x's own, float32 beside bfloat16.
ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == ScalarType::BFloat16 ? ScalarType::Float : x.scalar_type();
}

bool is_bf16(const Tensor& x) { return x.scalar_type() == ScalarType::BFloat16; }

// Whether x's strides are dense in the order `order` (outermost first); size-1 dimensions may
// have any stride, as in torch's own contiguity checks.
bool dense_in(const Tensor& x, const std::vector<int64_t>& order) {
  int64_t expected = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    int64_t d = *it, size = x.size(d);
    if (size != 1 && x.stride(d) != expected) return false;
    expected *= size;
  }
  return true;
}

// The kernels' view of x: NCHW (N, C, S) or rows of C channels (channels-last, or NCHW with
// one value per sample and channel, which is the same bytes).
std::optional<Layout> layout_of(const Tensor& x) {
  int64_t n = x.size(0), c = x.size(1);
  int64_t s = x.numel() / (n * c);
  if (x.is_contiguous()) {
    if (s > 1) return Layout{0, n, c, s};
    return Layout{1, n, c, 1};
  }
  if (x.dim() == 4 || x.dim() == 5) {
    std::vector<int64_t> order{0};
    for (int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
    order.push_back(1);
    if (dense_in(x, order)) return Layout{1, n * s, c, 1};
  }
  return std::nullopt;
}

Layout check_input(const char* op, const Tensor& x) {
  STD_TORCH_CHECK(x.defined(), op, ": x must be a tensor, got None");
  STD_TORCH_CHECK(x.is_cpu(), op, ": x must be a CPU tensor (this is the CPU kernel)");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double ||
                      x.scalar_type() == ScalarType::BFloat16,
                  op, ": x must be float32, float64 or bfloat16, got ",
                  torch::headeronly::toString(x.scalar_type()));
  STD_TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, *), got ", x.dim(), " dimensions");
  STD_TORCH_CHECK(x.numel() > 0, op, ": x must have at least one value, got ", x.numel());
  auto lay = layout_of(x);
  STD_TORCH_CHECK(lay.has_value(), op,
                  ": x must be contiguous or channels-last (other strides: call .contiguous())");
  return *lay;
}

// A (C,) tensor beside x: same dtype and device, C values, dense (copied when it is not and
// it is only read; `written` ones are refused instead).
const void* per_channel(const char* op, const char* name, const OptTensor& t, const Tensor& x,
                        std::vector<Tensor>& keep, bool written = false) {
  if (!t.has_value() || !t->defined()) return nullptr;
  const Tensor& v = *t;
  STD_TORCH_CHECK(v.is_cpu(), op, ": ", name, " must be a CPU tensor like x");
  STD_TORCH_CHECK(v.scalar_type() == stat_type(x), op, ": ", name,
                  is_bf16(x) ? " must be float32 beside a bfloat16 x, got "
                             : " must have x's dtype (",
                  is_bf16(x) ? "" : torch::headeronly::toString(x.scalar_type()),
                  is_bf16(x) ? "" : "), got ", torch::headeronly::toString(v.scalar_type()));
  STD_TORCH_CHECK(v.numel() == x.size(1), op, ": ", name, " must have C=", x.size(1),
                  " values, got ", v.numel());
  if (v.is_contiguous()) return v.data_ptr();
  STD_TORCH_CHECK(!written, op, ": ", name, " must be contiguous (it is written in place)");
  keep.push_back(torch::stable::contiguous(v));
  return keep.back().data_ptr();
}

// A new dense tensor of x's dtype on the CPU, straight from the shim (no dispatcher boxing:
// the stable ops' empty_like/new_empty cost a boxed call each, which small tensors feel).
Tensor alloc(const Tensor& x, torch::headeronly::IntHeaderOnlyArrayRef sizes,
             torch::headeronly::IntHeaderOnlyArrayRef strides, bool stats = false) {
  int32_t dtype = torch::stable::detail::to<int32_t>(
      torch::stable::detail::from(stats ? stat_type(x) : x.scalar_type()));
  AtenTensorHandle h;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), dtype,
      aoti_torch_device_type_cpu(), 0, &h));
  return Tensor(h);
}

// A (C,)-like vector of the statistics' dtype (x's, float32 beside bfloat16).
Tensor vec_like(const Tensor& x, int64_t n) {
  int64_t size[1] = {n}, stride[1] = {1};
  return alloc(x, {size, 1}, {stride, 1}, true);
}

// An uninitialised tensor with x's shape, dtype and (dense) strides; large ones in a huge-page
// buffer of the kernels, given back to their cache when the tensor is freed.
Tensor output_like(const Tensor& x) {
  int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  if (bytes >= kBufferMinBytes) {
    size_t cap = 0;
    void* p = bnlab_buffer_take(static_cast<size_t>(bytes), &cap);
    if (p != nullptr) {
      return torch::stable::from_blob(
          p, x.sizes(), x.strides(), x.device(), x.scalar_type(),
          [cap](void* data) { bnlab_buffer_give(data, cap); });
    }
  }
  return torch::stable::empty_like(x);
}

int threads() { return static_cast<int>(torch::stable::get_num_threads()); }

void check_act(const char* op, int64_t act, int64_t most) {
  STD_TORCH_CHECK(act >= 0 && act <= most, op, ": act code must be in 0..", most, ", got ",
                  act);
}

void check_rc(const char* op, int rc) {
  STD_TORCH_CHECK(rc != -1, op, ": out of memory for the kernel's scratch space");
  STD_TORCH_CHECK(rc != -2, op, ": invalid arguments reached the kernel");
}

// Training forward: batch moments (biased variance), y = act((x - mean) invstd w + b), the
// (C,) values backward needs, and, with running buffers, the running update in the same pass
// (skipped when a statistic is NaN/Inf: `finite` says which happened).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool> train_forward_update(
    Tensor x, OptTensor weight, OptTensor bias, OptTensor running_mean, OptTensor running_var,
    double factor, double unbias, double eps, int64_t act, double slope, OptTensor out) {
  const char* op = "bnlab::train_forward_update";
  Layout lay = check_input(op, x);
  check_act(op, act, kActLeaky);
  STD_TORCH_CHECK(!is_bf16(x) || act == 0, op,
                  ": a bfloat16 x trains with the identity only (act code 0), got ", act);
  STD_TORCH_CHECK(eps > 0 && eps < 1e300, op, ": eps must be a positive finite float, got ",
                  eps);
  std::vector<Tensor> keep;
  const void* w = per_channel(op, "weight", weight, x, keep);
  const void* b = per_channel(op, "bias", bias, x, keep);
  void* rm = const_cast<void*>(per_channel(op, "running_mean", running_mean, x, keep, true));
  void* rv = const_cast<void*>(per_channel(op, "running_var", running_var, x, keep, true));
  STD_TORCH_CHECK((rm == nullptr) == (rv == nullptr), op,
                  ": running_mean and running_var go together (both or neither)");
  Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    bool same = y.dim() == x.dim() && y.scalar_type() == x.scalar_type() && y.is_cpu();
    for (int64_t d = 0; same && d < x.dim(); ++d)
      same = y.size(d) == x.size(d) && y.stride(d) == x.stride(d);
    STD_TORCH_CHECK(same, op, ": out must have x's shape, strides, dtype and device");
  } else {
    y = output_like(x);
  }
  int64_t c = x.size(1);
  Tensor mean = vec_like(x, c), var = vec_like(x, c), invstd = vec_like(x, c),
         delta = vec_like(x, c), thr = vec_like(x, act == 0 ? 0 : c);
  int rc = bnlab_train_fwd(dtype_code(x), lay.nhwc, x.data_ptr(), y.data_ptr(), lay.n, lay.c,
                           lay.s, w, b, mean.data_ptr(), var.data_ptr(), invstd.data_ptr(),
                           delta.data_ptr(), act == 0 ? nullptr : thr.data_ptr(), eps,
                           static_cast<int>(act), slope, rm, rv, factor, unbias, threads());
  check_rc(op, rc);
  return {y, mean, var, invstd, delta, thr, rc == 1};
}

// The functional training forward (no running buffers, a new output): the operator graphs
// capture and autograd differentiates (bnlab/kernels/library.py).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> train_forward(Tensor x,
                                                                         OptTensor weight,
                                                                         OptTensor bias,
                                                                         double eps, int64_t act,
                                                                         double slope) {
  auto r = train_forward_update(x, weight, bias, std::nullopt, std::nullopt, 0.0, 1.0, eps, act,
                                slope, std::nullopt);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
          std::get<5>(r)};
}

// Evaluation forward with given statistics; with eps >= 0, `invstd` holds the variance and the
// kernel takes 1 / sqrt(var + eps) itself (in double).
Tensor eval_forward(Tensor x, Tensor mean, Tensor invstd, OptTensor weight, OptTensor bias,
                    int64_t act, double slope, double eps) {
  const char* op = "bnlab::eval_forward";
  Layout lay = check_input(op, x);
  check_act(op, act, kActLeaky);
  std::vector<Tensor> keep;
  const void* m = per_channel(op, "mean", mean, x, keep);
  const void* s = per_channel(op, eps >= 0 ? "var" : "invstd", invstd, x, keep);
  STD_TORCH_CHECK(m != nullptr && s != nullptr, op, ": mean and invstd are required");
  const void* w = per_channel(op, "weight", weight, x, keep);
  const void* b = per_channel(op, "bias", bias, x, keep);
  Tensor y = output_like(x);
  int rc = bnlab_eval_fwd(dtype_code(x), lay.nhwc, x.data_ptr(), y.data_ptr(), lay.n, lay.c,
                          lay.s, m, s, w, b, static_cast<int>(act), slope, eps, threads());
  check_rc(op, rc);
  return y;
}

// Backward of training (train=true: through the batch statistics, which are recomputed from x
// when mean and invstd are None) or of evaluation (fixed statistics). dx is empty unless
// need_dx; dw = sum(dy xhat), db = sum(dy) per channel.
std::tuple<Tensor, Tensor, Tensor> backward(Tensor dy, Tensor x, OptTensor mean,
                                            OptTensor invstd, OptTensor delta, OptTensor thr,
                                            OptTensor weight, OptTensor bias,
                                            OptTensor grad_mean, OptTensor grad_var, double eps,
                                            int64_t act, double slope, bool train,
                                            bool need_dx) {
  const char* op = "bnlab::backward";
  Layout lay = check_input(op, x);
  check_act(op, act, kActInvLeaky);
  if (is_bf16(x)) {
    STD_TORCH_CHECK(act == 0, op, ": a bfloat16 x takes the identity only (act code 0), got ",
                    act);
    STD_TORCH_CHECK(mean.has_value() && mean->defined() && invstd.has_value() &&
                        invstd->defined(),
                    op, ": a bfloat16 x needs the saved mean and invstd");
    STD_TORCH_CHECK(!(grad_mean.has_value() && grad_mean->defined()) &&
                        !(grad_var.has_value() && grad_var->defined()),
                    op, ": a bfloat16 x takes no gradient of the statistics (grad_mean, grad_var)");
  }
  STD_TORCH_CHECK(dy.defined() && dy.dim() == x.dim(), op, ": dy must have x's shape");
  for (int64_t d = 0; d < x.dim(); ++d)
    STD_TORCH_CHECK(dy.size(d) == x.size(d), op, ": dy must have x's shape, differs in dim ",
                    d, " (", dy.size(d), " vs ", x.size(d), ")");
  STD_TORCH_CHECK(dy.is_cpu() && dy.scalar_type() == x.scalar_type(), op,
                  ": dy must be a CPU tensor of x's dtype");
  bool same_strides = true;
  for (int64_t d = 0; d < x.dim(); ++d) same_strides = same_strides && dy.stride(d) == x.stride(d);
  if (!same_strides) {
    Tensor dense = alloc(x, x.sizes(), x.strides());
    torch::stable::copy_(dense, dy);
    dy = dense;
  }
  std::vector<Tensor> keep;
  const void* m = per_channel(op, "mean", mean, x, keep);
  const void* is = per_channel(op, "invstd", invstd, x, keep);
  STD_TORCH_CHECK((m == nullptr) == (is == nullptr) && (train || m != nullptr), op,
                  ": mean and invstd go together (in training both may be None: recomputed)");
  if (train && m == nullptr)
    STD_TORCH_CHECK(eps > 0 && eps < 1e300, op, ": eps must be a positive finite float, got ",
                    eps);
  const void* dl = per_channel(op, "delta", delta, x, keep);
  const void* th = thr.has_value() && thr->defined() && thr->numel() == 0
                       ? nullptr
                       : per_channel(op, "thr", thr, x, keep);
  const void* w = per_channel(op, "weight", weight, x, keep);
  const void* b = per_channel(op, "bias", bias, x, keep);
  const void* gm = per_channel(op, "grad_mean", grad_mean, x, keep);
  const void* gv = per_channel(op, "grad_var", grad_var, x, keep);
  int64_t c = x.size(1);
  Tensor dx = need_dx ? output_like(x) : vec_like(x, 0);
  Tensor dw = vec_like(x, c), db = vec_like(x, c);
  int rc = bnlab_backward(dtype_code(x), lay.nhwc, dy.data_ptr(), x.data_ptr(),
                          need_dx ? dx.data_ptr() : nullptr, lay.n, lay.c, lay.s, m, is, dl,
                          th, w, b, gm, gv, dw.data_ptr(), db.data_ptr(), eps,
                          static_cast<int>(act), slope, train ? 1 : 0, threads());
  check_rc(op, rc);
  return {dx, dw, db};
}

// The running update from torch's training kernel's saved statistics (mean, 1/sqrt(var + eps)),
// in place and only when every one is finite: rm += factor (mean - rm), rv += factor (var
// unbias - rv), var = 1/invstd^2 - eps, and num_batches_tracked += 1. A negative factor is the
// cumulative average's, 1 / (num_batches_tracked + 1). Returns whether they moved. For eager
// layers on torch's kernels (small inputs), so that no NaN/Inf batch enters the statistics.
template <typename T>
bool update_running(T* rm, T* rv, const T* mean, const T* invstd, int64_t c, double factor,
                    double unbias, double eps) {
  for (int64_t i = 0; i < c; ++i) {
    double m = mean[i], r = invstd[i];
    if (!std::isfinite(m) || !std::isfinite(r) || !(r > 0)) return false;
  }
  for (int64_t i = 0; i < c; ++i) {
    double r = invstd[i];
    double var = 1.0 / (r * r) - eps;
    if (var < 0) var = 0;
    rm[i] = static_cast<T>(rm[i] + factor * (static_cast<double>(mean[i]) - rm[i]));
    rv[i] = static_cast<T>(rv[i] + factor * (var * unbias - rv[i]));
  }
  return true;
}

bool running_update(Tensor running_mean, Tensor running_var, Tensor num_batches_tracked,
                    Tensor mean, Tensor invstd, double factor, double unbias, double eps) {
  const char* op = "bnlab::running_update_";
  STD_TORCH_CHECK(num_batches_tracked.defined() && num_batches_tracked.is_cpu() &&
                      num_batches_tracked.numel() == 1 &&
                      num_batches_tracked.scalar_type() == ScalarType::Long,
                  op, ": num_batches_tracked must be a CPU int64 tensor of one value");
  int64_t* seen = static_cast<int64_t*>(num_batches_tracked.data_ptr());
  if (factor < 0) factor = 1.0 / static_cast<double>(*seen + 1);
  const Tensor* all[4] = {&running_mean, &running_var, &mean, &invstd};
  const char* names[4] = {"running_mean", "running_var", "mean", "invstd"};
  int64_t c = running_mean.numel();
  for (int i = 0; i < 4; ++i) {
    const Tensor& t = *all[i];
    STD_TORCH_CHECK(t.defined() && t.is_cpu() && t.is_contiguous(), op, ": ", names[i],
                    " must be a contiguous CPU tensor");
    STD_TORCH_CHECK(t.scalar_type() == running_mean.scalar_type(), op, ": ", names[i],
                    " must have running_mean's dtype");
    STD_TORCH_CHECK(t.numel() == c, op, ": ", names[i], " must have ", c, " values, got ",
                    t.numel());
  }
  bool moved;
  if (running_mean.scalar_type() == ScalarType::Double) {
    moved = update_running(static_cast<double*>(running_mean.data_ptr()),
                           static_cast<double*>(running_var.data_ptr()),
                           static_cast<const double*>(mean.data_ptr()),
                           static_cast<const double*>(invstd.data_ptr()), c, factor, unbias,
                           eps);
  } else {
    STD_TORCH_CHECK(running_mean.scalar_type() == ScalarType::Float, op,
                    ": running statistics must be float32 or float64");
    moved = update_running(static_cast<float*>(running_mean.data_ptr()),
                           static_cast<float*>(running_var.data_ptr()),
                           static_cast<const float*>(mean.data_ptr()),
                           static_cast<const float*>(invstd.data_ptr()), c, factor, unbias, eps);
  }
  if (moved) *seen += 1;
  return moved;
}

// ---------------------------------------------------------------- masked BN (padded sequences)
// x is (N, C, L): contiguous (NCL) or the transpose of a contiguous (N, L, C) tensor (strides
// (L C, 1, C): rows of C channels); mask is a contiguous bool (N, L) tensor, true where valid.
// Statistics and gradients come from the valid positions only; outputs there are 0.

// 1 for rows of C channels, 0 for NCL, after checking x and mask.
int check_masked(const char* op, const Tensor& x, const Tensor& mask) {
  STD_TORCH_CHECK(x.defined() && x.is_cpu(), op, ": x must be a CPU tensor");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double,
                  op, ": x must be float32 or float64, got ",
                  torch::headeronly::toString(x.scalar_type()));
  STD_TORCH_CHECK(x.dim() == 3, op, ": x must be (N, C, L), got ", x.dim(), " dimensions");
  STD_TORCH_CHECK(x.numel() > 0, op, ": x must have at least one value, got ", x.numel());
  STD_TORCH_CHECK(mask.defined() && mask.is_cpu() && mask.scalar_type() == ScalarType::Bool, op,
                  ": mask must be a CPU bool tensor");
  STD_TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(2), op,
                  ": mask must have shape (N, L) = (", x.size(0), ", ", x.size(2), ")");
  STD_TORCH_CHECK(mask.is_contiguous(), op, ": mask must be contiguous");
  if (x.is_contiguous()) return 0;
  STD_TORCH_CHECK(dense_in(x, {0, 2, 1}), op,
                  ": x must be contiguous (N, C, L) or the transpose of a contiguous (N, L, C) "
                  "tensor (other strides: call .contiguous())");
  return 1;
}

// dy with x's strides (a copy when they differ)
Tensor like_x(const char* op, Tensor dy, const Tensor& x) {
  STD_TORCH_CHECK(dy.defined() && dy.dim() == x.dim() && dy.is_cpu() &&
                      dy.scalar_type() == x.scalar_type(),
                  op, ": dy must be a CPU tensor of x's shape and dtype");
  bool same = true;
  for (int64_t d = 0; d < x.dim(); ++d) {
    STD_TORCH_CHECK(dy.size(d) == x.size(d), op, ": dy must have x's shape, differs in dim ", d,
                    " (", dy.size(d), " vs ", x.size(d), ")");
    same = same && dy.stride(d) == x.stride(d);
  }
  if (same) return dy;
  Tensor dense = alloc(x, x.sizes(), x.strides());
  torch::stable::copy_(dense, dy);
  return dense;
}

const uint8_t* mask_bytes(const Tensor& mask) {
  return static_cast<const uint8_t*>(mask.data_ptr());
}

// Training forward: per-channel mean and biased variance of the valid positions (0 and 0 when
// there are none), delta (the exact mean minus the returned one, its rounding to x's dtype:
// backward and a synchronised merge use it) and, with need_y, y = (x - mean) / sqrt(var + eps)
// * weight + bias there (0 at padded positions; y is empty otherwise: the statistics a
// synchronised layer merges).
std::tuple<Tensor, Tensor, Tensor, Tensor> masked_forward(Tensor x, Tensor mask, OptTensor weight,
                                                          OptTensor bias, double eps,
                                                          bool need_y) {
  const char* op = "bnlab::masked_forward";
  int rows = check_masked(op, x, mask);
  STD_TORCH_CHECK(eps > 0 && eps < 1e300, op, ": eps must be a positive finite float, got ", eps);
  std::vector<Tensor> keep;
  const void* w = per_channel(op, "weight", weight, x, keep);
  const void* b = per_channel(op, "bias", bias, x, keep);
  int64_t c = x.size(1);
  Tensor y = need_y ? output_like(x) : vec_like(x, 0);
  Tensor mean = vec_like(x, c), var = vec_like(x, c), delta = vec_like(x, c);
  int rc = bnlab_masked_forward(dtype_code(x), rows, x.data_ptr(), mask_bytes(mask),
                                need_y ? y.data_ptr() : nullptr, x.size(0), c, x.size(2), w, b,
                                eps, mean.data_ptr(), var.data_ptr(), delta.data_ptr(),
                                threads());
  check_rc(op, rc);
  return {y, mean, var, delta};
}

// (x - mean - delta) / sqrt(var + eps) * weight + bias at the valid positions, 0 at padded
// ones (delta None: 0).
Tensor masked_normalize(Tensor x, Tensor mask, Tensor mean, OptTensor delta, Tensor var,
                        OptTensor weight, OptTensor bias, double eps) {
  const char* op = "bnlab::masked_normalize";
  int rows = check_masked(op, x, mask);
  STD_TORCH_CHECK(eps >= 0 && eps < 1e300, op, ": eps must be a finite float >= 0, got ", eps);
  std::vector<Tensor> keep;
  const void* m = per_channel(op, "mean", mean, x, keep);
  const void* dl = per_channel(op, "delta", delta, x, keep);
  const void* v = per_channel(op, "var", var, x, keep);
  const void* w = per_channel(op, "weight", weight, x, keep);
  const void* b = per_channel(op, "bias", bias, x, keep);
  Tensor y = output_like(x);
  int rc = bnlab_masked_affine(dtype_code(x), rows, nullptr, x.data_ptr(), mask_bytes(mask),
                               y.data_ptr(), x.size(0), x.size(1), x.size(2), m, dl, v, w, b,
                               nullptr, nullptr, eps, threads());
  check_rc(op, rc);
  return y;
}

// Training backward: per-channel sum(dy) and sum(dy (x - mean - delta)) over the valid
// positions and, with need_dx, dx from this batch's statistics (empty otherwise: a
// synchronised layer all-reduces the sums first, then calls masked_grad_input). Returns (dx,
// sum_dy, sum_dy_xmu).
std::tuple<Tensor, Tensor, Tensor> masked_backward(Tensor dy, Tensor x, Tensor mask, Tensor mean,
                                                   OptTensor delta, Tensor invstd,
                                                   OptTensor weight, bool need_dx) {
  const char* op = "bnlab::masked_backward";
  int rows = check_masked(op, x, mask);
  dy = like_x(op, dy, x);
  std::vector<Tensor> keep;
  const void* m = per_channel(op, "mean", mean, x, keep);
  const void* dl = per_channel(op, "delta", delta, x, keep);
  const void* is = per_channel(op, "invstd", invstd, x, keep);
  const void* w = per_channel(op, "weight", weight, x, keep);
  int64_t c = x.size(1);
  Tensor dx = need_dx ? output_like(x) : vec_like(x, 0);
  Tensor s1 = vec_like(x, c), s2 = vec_like(x, c);
  int rc = bnlab_masked_backward(dtype_code(x), rows, dy.data_ptr(), x.data_ptr(),
                                 mask_bytes(mask), need_dx ? dx.data_ptr() : nullptr, x.size(0), c,
                                 x.size(2), m, dl, is, w, s1.data_ptr(), s2.data_ptr(), threads());
  check_rc(op, rc);
  return {dx, s1, s2};
}

// dx = weight invstd (dy - mean_dy - (x - mean - delta) invstd^2 mean_dy_xmu) at the valid
// positions, 0 at padded ones: mean_dy, mean_dy_xmu are masked_backward's sums over every rank
// divided by the global valid count.
Tensor masked_grad_input(Tensor dy, Tensor x, Tensor mask, Tensor mean, OptTensor delta,
                         Tensor invstd, OptTensor weight, Tensor mean_dy, Tensor mean_dy_xmu) {
  const char* op = "bnlab::masked_grad_input";
  int rows = check_masked(op, x, mask);
  dy = like_x(op, dy, x);
  std::vector<Tensor> keep;
  const void* m = per_channel(op, "mean", mean, x, keep);
  const void* dl = per_channel(op, "delta", delta, x, keep);
  const void* is = per_channel(op, "invstd", invstd, x, keep);
  const void* w = per_channel(op, "weight", weight, x, keep);
  const void* gd = per_channel(op, "mean_dy", mean_dy, x, keep);
  const void* gx = per_channel(op, "mean_dy_xmu", mean_dy_xmu, x, keep);
  Tensor dx = output_like(x);
  int rc = bnlab_masked_affine(dtype_code(x), rows, dy.data_ptr(), x.data_ptr(),
                               mask_bytes(mask), dx.data_ptr(), x.size(0), x.size(1), x.size(2),
                               m, dl, is, w, nullptr, gd, gx, 0.0, threads());
  check_rc(op, rc);
  return dx;
}

// What the operators allocate their x-sized outputs with (for tests and benches of the cache).
Tensor empty_like(Tensor x) {
  STD_TORCH_CHECK(x.defined() && x.is_cpu(), "bnlab::empty_like: x must be a CPU tensor");
  return output_like(x);
}

}  // namespace

STABLE_TORCH_LIBRARY(bnlab, m) {
  m.def(
      "train_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int act, float slope) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "train_forward_update(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float factor, float unbias, float eps, int act, float slope, "
      "Tensor(c!)? out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool)");
  m.def(
      "eval_forward(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "int act, float slope, float eps) -> Tensor");
  m.def(
      "backward(Tensor dy, Tensor x, Tensor? mean, Tensor? invstd, Tensor? delta, Tensor? thr, "
      "Tensor? weight, Tensor? bias, Tensor? grad_mean, Tensor? grad_var, float eps, int act, "
      "float slope, bool train, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("empty_like(Tensor x) -> Tensor");
  m.def(
      "running_update_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, Tensor mean, Tensor invstd, float factor, float unbias, "
      "float eps) -> bool");
  m.def(
      "masked_forward(Tensor x, Tensor mask, Tensor? weight, Tensor? bias, float eps, "
      "bool need_y) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_normalize(Tensor x, Tensor mask, Tensor mean, Tensor? delta, Tensor var, "
      "Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def(
      "masked_backward(Tensor dy, Tensor x, Tensor mask, Tensor mean, Tensor? delta, "
      "Tensor invstd, Tensor? weight, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_grad_input(Tensor dy, Tensor x, Tensor mask, Tensor mean, Tensor? delta, "
      "Tensor invstd, Tensor? weight, Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("train_forward", TORCH_BOX(&train_forward));
  m.impl("train_forward_update", TORCH_BOX(&train_forward_update));
  m.impl("eval_forward", TORCH_BOX(&eval_forward));
  m.impl("backward", TORCH_BOX(&backward));
  m.impl("empty_like", TORCH_BOX(&empty_like));
  m.impl("running_update_", TORCH_BOX(&running_update));
  m.impl("masked_forward", TORCH_BOX(&masked_forward));
  m.impl("masked_normalize", TORCH_BOX(&masked_normalize));
  m.impl("masked_backward", TORCH_BOX(&masked_backward));
  m.impl("masked_grad_input", TORCH_BOX(&masked_grad_input));
}
