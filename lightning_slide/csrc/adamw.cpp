// The host's AdamW step: one pass over memory per parameter, in the operation order of
// lightning_slide.optim._adamw_update. The moments fp32 or bf16 (read into fp32, rounded back to the nearest bf16,
// ties to even), the gradients fp32 or bf16 (as the GPU computed them: widened as they are read); optionally the
// updated parameter's bf16 copy written in the same pass (the compute copy uploads read). Also accumulation's
// gradient sum with the sum's norm in the same pass (add_square_sum_).
// Built on first use by lightning_slide/optim.py (torch.utils.cpp_extension); the compiler vectorizes the loop.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

namespace {

inline float widen(uint16_t half) {
  uint32_t bits = uint32_t(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint16_t narrow(float value) {  // round to nearest even, as c10::BFloat16 does; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return uint16_t(value != value ? 0x7fc0u : rounded);
}

inline float load(const float* data, int64_t i) { return data[i]; }
inline float load(const uint16_t* data, int64_t i) { return widen(data[i]); }
inline void store(float* data, int64_t i, float value) { data[i] = value; }
inline void store(uint16_t* data, int64_t i, float value) { data[i] = narrow(value); }

struct Scalars {  // fp32, as torch's fused kernel rounds its double scalars
  float keep, neg_step, weight, beta2, new_share, eps, bias2_sqrt, factor, clip;
};

// Close to torch's fused CPU AdamW operation by operation (the lerp and the second moment's sum each one fused
// multiply-add): within a rounding of its results, not bit for bit.
template <bool Small, bool Copy, typename P, typename G, typename M>
void update_range(P* __restrict param, const G* __restrict grad, M* __restrict exp_avg, M* __restrict exp_avg_sq,
                  uint16_t* __restrict copy, int64_t begin, int64_t end, const Scalars s) {
  // Locals and restrict pointers: the stores cannot alias them, so the compiler vectorizes the loop.
  const float keep = s.keep, neg_step = s.neg_step, weight = s.weight, beta2 = s.beta2, new_share = s.new_share;
  const float eps = s.eps, bias2_sqrt = s.bias2_sqrt, factor = s.factor, clip = s.clip;
  const float lerp_scale = Small ? weight : weight - 1.0f;
  for (int64_t i = begin; i < end; ++i) {
    const float g = std::min(std::max(load(grad, i), -clip), clip) * factor;  // NaN stays NaN
    const float m_old = load(exp_avg, i);
    const float m = std::fma(lerp_scale, g - m_old, Small ? m_old : g);  // torch's lerp
    const float v = std::fma(new_share * g, g, load(exp_avg_sq, i) * beta2);
    const float denom = std::sqrt(v) / bias2_sqrt + eps;
    const float p = load(param, i) * keep + neg_step * m / denom;
    store(param, i, p);
    if (Copy) copy[i] = narrow(p);  // the value the cast of the stored parameter gives
    store(exp_avg, i, m);
    store(exp_avg_sq, i, v);
  }
}

template <typename P, typename G, typename M>
void update(P* param, const G* grad, M* exp_avg, M* exp_avg_sq, uint16_t* copy, int64_t numel, const float* hyper) {
  // hyper: 1 - lr * decay, -lr / bias1, 1 - beta1, beta2, 1 - beta2, eps, sqrt(bias2), the gradients' factor (its
  // sign: maximize; 1 / GradScaler's scale, a multiplication where torch divides: one division less per element),
  // clip (each gradient element clamped to [-clip, clip] first: clipping by value; inf: none)
  const Scalars s{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6], hyper[7], hyper[8]};
  const bool small = std::abs(s.weight) < 0.5f;  // torch's lerp takes the side of the smaller weight
  at::parallel_for(0, numel, 1 << 14, [=](int64_t begin, int64_t end) {
    if (copy != nullptr) {
      small ? update_range<true, true>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s)
            : update_range<false, true>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s);
    } else {
      small ? update_range<true, false>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s)
            : update_range<false, false>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s);
    }
  });
}

// A tensor's data as what the loop reads and writes: float for fp32, its raw 16 bits for bf16.
template <typename T>
T* data(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename P, typename M>
void update_for_grad(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& exp_avg,
                     const torch::Tensor& exp_avg_sq, uint16_t* copy, const float* hyper) {
  P* p = data<P>(param);
  M* m = data<M>(exp_avg);
  M* v = data<M>(exp_avg_sq);
  if (grad.scalar_type() == torch::kFloat32) {
    update(p, data<const float>(grad), m, v, copy, param.numel(), hyper);
  } else {
    update(p, data<const uint16_t>(grad), m, v, copy, param.numel(), hyper);
  }
}

bool fp32_or_bf16(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}

}  // namespace

// In place on flat contiguous CPU tensors: param and grad fp32 or bf16, the moments both fp32 or both bf16, hyper
// 9 fp32 values; copy (optional, bf16): receives the updated parameter rounded to bf16.
void adamw_(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                 torch::Tensor hyper, std::optional<torch::Tensor> copy) {
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq, &hyper}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "adamw_: contiguous CPU tensors only");
  }
  const int64_t n = param.numel();
  TORCH_CHECK(grad.numel() == n && exp_avg.numel() == n && exp_avg_sq.numel() == n, "adamw_: sizes differ");
  TORCH_CHECK(fp32_or_bf16(param) && fp32_or_bf16(grad) && fp32_or_bf16(exp_avg),
              "adamw_: param, grad and the moments must be fp32 or bf16");
  TORCH_CHECK(exp_avg_sq.scalar_type() == exp_avg.scalar_type(), "adamw_: the moments must have one dtype");
  TORCH_CHECK(hyper.scalar_type() == torch::kFloat32 && hyper.numel() == 9, "adamw_: hyper is 9 fp32 values");
  uint16_t* c = nullptr;
  if (copy.has_value()) {
    TORCH_CHECK(copy->device().is_cpu() && copy->is_contiguous() && copy->scalar_type() == torch::kBFloat16 &&
                    copy->numel() == n,
                "adamw_: copy is a contiguous bf16 CPU tensor of the parameter's size");
    c = data<uint16_t>(*copy);
  }
  const float* h = hyper.data_ptr<float>();
  const bool p32 = param.scalar_type() == torch::kFloat32, m32 = exp_avg.scalar_type() == torch::kFloat32;
  if (p32 && m32) {
    update_for_grad<float, float>(param, grad, exp_avg, exp_avg_sq, c, h);
  } else if (p32) {
    update_for_grad<float, uint16_t>(param, grad, exp_avg, exp_avg_sq, c, h);
  } else if (m32) {
    update_for_grad<uint16_t, float>(param, grad, exp_avg, exp_avg_sq, c, h);
  } else {
    update_for_grad<uint16_t, uint16_t>(param, grad, exp_avg, exp_avg_sq, c, h);
  }
}

// Accumulation's gradient sum, total += part (flat contiguous fp32 CPU tensors), returning the sum of the new
// total's squares: the summed gradient's norm comes from the pass that makes it, not from one more read of it.
double add_square_sum_(torch::Tensor total, torch::Tensor part) {
  TORCH_CHECK(total.device().is_cpu() && part.device().is_cpu() && total.is_contiguous() && part.is_contiguous() &&
                  total.scalar_type() == torch::kFloat32 && part.scalar_type() == torch::kFloat32 &&
                  total.numel() == part.numel(),
              "add_square_sum_: two contiguous fp32 CPU tensors of one size");
  float* __restrict t = total.data_ptr<float>();
  const float* __restrict p = part.data_ptr<float>();
  // Squares summed in 16 fp32 lanes (one vector) over blocks of 1024 elements, each block's in double: the lanes
  // carry no dependency from one element to the next, so the loop vectorizes as the AdamW loop does.
  constexpr int64_t kLanes = 16, kBlock = 1024;
  return at::parallel_reduce(
      0, total.numel(), 1 << 14, 0.0,
      [=](int64_t begin, int64_t end, double sum) {
        for (int64_t i = begin; i < end; i += kBlock) {
          const int64_t stop = std::min(end, i + kBlock);
          float lanes[kLanes] = {};
          int64_t j = i;
          for (; j + kLanes <= stop; j += kLanes) {
            for (int64_t k = 0; k < kLanes; ++k) {
              const float v = t[j + k] + p[j + k];
              t[j + k] = v;
              lanes[k] += v * v;
            }
          }
          double block = 0.0;
          for (; j < stop; ++j) {
            const float v = t[j] + p[j];
            t[j] = v;
            block += double(v) * double(v);
          }
          for (int64_t k = 0; k < kLanes; ++k) block += lanes[k];
          sum += block;
        }
        return sum;
      },
      std::plus<double>());
}

// The GIL is released for the update: the training thread goes on launching the device's work meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adamw_", &adamw_, py::call_guard<py::gil_scoped_release>());
  module.def("add_square_sum_", &add_square_sum_, py::call_guard<py::gil_scoped_release>());
}
