// The host's AdamW step with bf16 moments: one pass over memory per parameter, the moments read into fp32 and
// rounded back to the nearest bf16 (ties to even), in the operation order of lightning_slide.optim._adamw_update;
// optionally the updated parameter's bf16 copy written in the same pass (the compute copy uploads read).
// Built on first use by lightning_slide/optim.py (torch.utils.cpp_extension); the compiler vectorizes the loop.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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

struct Scalars {  // as the eager ops compute them, in fp32
  float weight, rest, new_share, beta2, eps, bias2_sqrt, keep, step, factor, clip;
  bool small;  // torch's lerp takes the side of the smaller weight
};

template <bool Small, bool Copy, typename P, typename G>
void update_range(P* __restrict param, const G* __restrict grad, uint16_t* __restrict exp_avg,
                  uint16_t* __restrict exp_avg_sq, uint16_t* __restrict copy, int64_t begin, int64_t end,
                  const Scalars s) {
  // Locals and restrict pointers: the stores cannot alias them, so the compiler vectorizes the loop.
  const float weight = s.weight, rest = s.rest, new_share = s.new_share, beta2 = s.beta2, eps = s.eps;
  const float bias2_sqrt = s.bias2_sqrt, keep = s.keep, step = s.step, factor = s.factor, clip = s.clip;
  for (int64_t i = begin; i < end; ++i) {
    const float g = std::min(std::max(load(grad, i), -clip), clip) * factor;  // NaN stays NaN
    const float m_old = widen(exp_avg[i]);
    const float diff = g - m_old;
    const float m = Small ? m_old + weight * diff : g - diff * rest;
    const float v = widen(exp_avg_sq[i]) * beta2 + g * g * new_share;
    const float denom = std::sqrt(v) / bias2_sqrt + eps;
    const float p = load(param, i) * keep - step * m / denom;
    store(param, i, p);
    if (Copy) copy[i] = narrow(p);  // the value the cast of the stored parameter gives
    exp_avg[i] = narrow(m);
    exp_avg_sq[i] = narrow(v);
  }
}

template <typename P, typename G>
void update(P* param, const G* grad, uint16_t* exp_avg, uint16_t* exp_avg_sq, uint16_t* copy, int64_t numel,
            const float* hyper) {
  // hyper: lr, beta1, beta2, eps, decay, bias1, sqrt(bias2), factor (each gradient's: sign and unscaling), clip
  // (each gradient element clamped to [-clip, clip] first: clipping by value; inf: none)
  const float lr = hyper[0], beta1 = hyper[1], decay = hyper[4], bias1 = hyper[5];
  Scalars s;
  s.weight = 1.0f - beta1;
  s.rest = 1.0f - s.weight;
  s.beta2 = hyper[2];
  s.new_share = 1.0f - s.beta2;
  s.eps = hyper[3];
  s.bias2_sqrt = hyper[6];
  s.keep = 1.0f - lr * decay;
  s.step = lr / bias1;
  s.factor = hyper[7];
  s.clip = hyper[8];
  s.small = std::abs(s.weight) < 0.5f;
  at::parallel_for(0, numel, 1 << 14, [=](int64_t begin, int64_t end) {
    if (copy != nullptr) {
      s.small ? update_range<true, true>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s)
              : update_range<false, true>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s);
    } else {
      s.small ? update_range<true, false>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s)
              : update_range<false, false>(param, grad, exp_avg, exp_avg_sq, copy, begin, end, s);
    }
  });
}

template <typename P>
void update_for_grad(const torch::Tensor& param, const torch::Tensor& grad, uint16_t* m, uint16_t* v, uint16_t* copy,
                     const float* hyper) {
  P* p = reinterpret_cast<P*>(param.data_ptr());
  if (grad.scalar_type() == torch::kFloat32) {
    update(p, grad.data_ptr<float>(), m, v, copy, param.numel(), hyper);
  } else {
    update(p, reinterpret_cast<const uint16_t*>(grad.data_ptr()), m, v, copy, param.numel(), hyper);
  }
}

}  // namespace

// In place on flat contiguous CPU tensors: param and grad fp32 or bf16, the moments bf16, hyper 9 fp32 values;
// copy (optional, bf16): receives the updated parameter rounded to bf16.
void adamw_bf16_(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                 torch::Tensor hyper, std::optional<torch::Tensor> copy) {
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq, &hyper}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "adamw_bf16_: contiguous CPU tensors only");
  }
  const int64_t n = param.numel();
  TORCH_CHECK(grad.numel() == n && exp_avg.numel() == n && exp_avg_sq.numel() == n, "adamw_bf16_: sizes differ");
  TORCH_CHECK(exp_avg.scalar_type() == torch::kBFloat16 && exp_avg_sq.scalar_type() == torch::kBFloat16,
              "adamw_bf16_: the moments must be bf16");
  for (const auto* t : {&param, &grad}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 || t->scalar_type() == torch::kBFloat16,
                "adamw_bf16_: param and grad must be fp32 or bf16");
  }
  TORCH_CHECK(hyper.scalar_type() == torch::kFloat32 && hyper.numel() == 9, "adamw_bf16_: hyper is 9 fp32 values");
  uint16_t* c = nullptr;
  if (copy.has_value()) {
    TORCH_CHECK(copy->device().is_cpu() && copy->is_contiguous() && copy->scalar_type() == torch::kBFloat16 &&
                    copy->numel() == n,
                "adamw_bf16_: copy is a contiguous bf16 CPU tensor of the parameter's size");
    c = reinterpret_cast<uint16_t*>(copy->data_ptr());
  }
  auto* m = reinterpret_cast<uint16_t*>(exp_avg.data_ptr());
  auto* v = reinterpret_cast<uint16_t*>(exp_avg_sq.data_ptr());
  const float* h = hyper.data_ptr<float>();
  if (param.scalar_type() == torch::kFloat32) {
    update_for_grad<float>(param, grad, m, v, c, h);
  } else {
    update_for_grad<uint16_t>(param, grad, m, v, c, h);
  }
}

// The GIL is released for the update: the training thread goes on launching the device's work meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adamw_bf16_", &adamw_bf16_, py::call_guard<py::gil_scoped_release>());
}
