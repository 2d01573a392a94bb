// bindings.cpp — the pybind11 module fusedres._C. Host compiler only: it sees fr_api.h (plain C++) and the
// planning functions of fr_math.h, never CUDA or torch headers. Pointers arrive as Python ints
// (tensor.data_ptr(), 0 for an absent optional tensor); fusedres/cuda.py allocates every output.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include <cstdint>

#include "fr_api.h"
#include "fr_math.h"

namespace py = pybind11;
using u = std::uintptr_t;

template <class T>
static T* ptr(u p) {
  return reinterpret_cast<T*>(p);
}

// The per-channel part of a forward finalize, shared by stats_finalize and stats_reduce_finalize.
static fr::StatsFinalizeArgs stats_args(u mean, u var, u weight, u bias, float eps, u scale, u shift, u running_mean,
                                        u running_var, u num_batches_tracked, float momentum, float unbias,
                                        u increment) {
  fr::StatsFinalizeArgs a;
  a.mean = ptr<float>(mean);
  a.var = ptr<float>(var);
  a.weight = ptr<const float>(weight);
  a.bias = ptr<const float>(bias);
  a.eps = eps;
  a.scale = ptr<float>(scale);
  a.shift = ptr<float>(shift);
  a.running_mean = ptr<float>(running_mean);
  a.running_var = ptr<float>(running_var);
  a.num_batches_tracked = ptr<const std::int64_t>(num_batches_tracked);
  a.momentum = momentum;
  a.unbias = unbias;
  a.increment = ptr<std::int64_t>(increment);
  return a;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedres CUDA kernels (raw pointers, sizes and a stream; see csrc/fr_api.h)";

  py::class_<fr::Launch>(m, "Launch", "Sizes, layout, dtype, device and stream of one launch.")
      .def(py::init([](std::int64_t n, int c, std::int64_t hw, bool channels_last, int dtype, int device,
                       int sm_count, u stream) {
             fr::Launch L;
             L.n = n;
             L.c = c;
             L.hw = hw;
             L.channels_last = channels_last;
             L.dtype = dtype;
             L.device = device;
             L.sm_count = sm_count;
             L.stream = stream;
             return L;
           }),
           py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("dtype"), py::arg("device"),
           py::arg("sm_count"), py::arg("stream"));

  m.attr("FLOAT32") = static_cast<int>(fr::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(fr::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(fr::kBFloat16);

  m.def("reduce_splits", &fr::reduce_splits, py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"),
        py::arg("elem_size"), py::arg("sm_count"),
        "Row splits of a reduction: size its workspace as quantities * splits * C floats.");

  m.def(
      "apply",
      [](const fr::Launch& L, u x, u mean, u scale, u shift, u res, u xb, u mean_b, u scale_b, u shift_b, u y,
         bool relu) {
        fr::apply(L, ptr<const void>(x), ptr<const float>(mean), ptr<const float>(scale), ptr<const float>(shift),
                  ptr<const void>(res), ptr<const void>(xb), ptr<const float>(mean_b), ptr<const float>(scale_b),
                  ptr<const float>(shift_b), ptr<void>(y), relu);
      },
      py::arg("launch"), py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("shift"), py::arg("res"),
      py::arg("xb"), py::arg("mean_b"), py::arg("scale_b"), py::arg("shift_b"), py::arg("y"), py::arg("relu"));

  m.def(
      "backward_reduce",
      [](const fr::Launch& L, u dy, u x, u scale, u shift, u mean, u res, u xb, u scale_b, u shift_b, u mean_b,
         bool relu, u grad_res, u sum_g, u sum_g_xc, u sum_g_xbc, u ws, std::int64_t ws_numel, int splits) {
        fr::backward_reduce(L, ptr<const void>(dy), ptr<const void>(x), ptr<const float>(scale),
                            ptr<const float>(shift), ptr<const float>(mean), ptr<const void>(res),
                            ptr<const void>(xb), ptr<const float>(scale_b), ptr<const float>(shift_b),
                            ptr<const float>(mean_b), relu, ptr<void>(grad_res), ptr<float>(sum_g),
                            ptr<float>(sum_g_xc), ptr<float>(sum_g_xbc), ptr<float>(ws), ws_numel, splits);
      },
      py::arg("launch"), py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("mean"),
      py::arg("res"), py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"), py::arg("mean_b"), py::arg("relu"),
      py::arg("grad_res"), py::arg("sum_g"), py::arg("sum_g_xc"), py::arg("sum_g_xbc"), py::arg("ws"),
      py::arg("ws_numel"), py::arg("splits"));

  m.def(
      "backward_apply",
      [](const fr::Launch& L, u dy, u x, u scale, u shift, u res, u xb, u scale_b, u shift_b, bool relu, u mean,
         u k_g, u k_x, u k_c, u mean_b, u k_g_b, u k_x_b, u k_c_b, u dx, u dxb) {
        fr::backward_apply(L, ptr<const void>(dy), ptr<const void>(x), ptr<const float>(scale),
                           ptr<const float>(shift), ptr<const void>(res), ptr<const void>(xb),
                           ptr<const float>(scale_b), ptr<const float>(shift_b), relu, ptr<const float>(mean),
                           ptr<const float>(k_g), ptr<const float>(k_x), ptr<const float>(k_c),
                           ptr<const float>(mean_b), ptr<const float>(k_g_b), ptr<const float>(k_x_b),
                           ptr<const float>(k_c_b), ptr<void>(dx), ptr<void>(dxb));
      },
      py::arg("launch"), py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("res"),
      py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"), py::arg("relu"), py::arg("mean"), py::arg("k_g"),
      py::arg("k_x"), py::arg("k_c"), py::arg("mean_b"), py::arg("k_g_b"), py::arg("k_x_b"), py::arg("k_c_b"),
      py::arg("dx"), py::arg("dxb"));

  m.def(
      "stats_partials",
      [](const fr::Launch& L, u x, u ws, std::int64_t ws_numel, int splits) {
        fr::stats_partials(L, ptr<const void>(x), ptr<float>(ws), ws_numel, splits);
      },
      py::arg("launch"), py::arg("x"), py::arg("ws"), py::arg("ws_numel"), py::arg("splits"),
      "One launch: the statistics partials into ws (for stats_finalize).");

  m.def(
      "stats_finalize",
      [](const fr::Launch& L, u ws, int splits, u mean, u var, u weight, u bias, float eps, u scale, u shift,
         u running_mean, u running_var, u num_batches_tracked, float momentum, float unbias, u increment) {
        fr::StatsFinalizeArgs a = stats_args(mean, var, weight, bias, eps, scale, shift, running_mean, running_var,
                                             num_batches_tracked, momentum, unbias, increment);
        a.ws = ptr<const float>(ws);
        a.splits = splits;
        fr::stats_finalize(L, a);
      },
      py::arg("launch"), py::arg("ws"), py::arg("splits"), py::arg("mean"), py::arg("var"), py::arg("weight"),
      py::arg("bias"), py::arg("eps"), py::arg("scale"), py::arg("shift"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("num_batches_tracked"), py::arg("momentum"), py::arg("unbias"),
      py::arg("increment") = 0,
      "One launch: mean, var (ws = 0: read), scale, shift; running statistics updated, num_batches_tracked "
      "incremented (fr_api.h).");

  m.def(
      "stats_reduce_finalize",
      [](const fr::Launch& L, u x, u ws, std::int64_t ws_numel, int splits, u mean, u var, u weight, u bias,
         float eps, u scale, u shift, u running_mean, u running_var, u num_batches_tracked, float momentum,
         float unbias, u increment, u sem, std::int64_t sem_numel) {
        const fr::StatsFinalizeArgs a = stats_args(mean, var, weight, bias, eps, scale, shift, running_mean,
                                                   running_var, num_batches_tracked, momentum, unbias, increment);
        fr::stats_reduce_finalize(L, ptr<const void>(x), ptr<float>(ws), ws_numel, splits, a, ptr<unsigned>(sem),
                                  sem_numel);
      },
      py::arg("launch"), py::arg("x"), py::arg("ws"), py::arg("ws_numel"), py::arg("splits"), py::arg("mean"),
      py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("scale"), py::arg("shift"),
      py::arg("running_mean"), py::arg("running_var"), py::arg("num_batches_tracked"), py::arg("momentum"),
      py::arg("unbias"), py::arg("increment"), py::arg("sem"), py::arg("sem_numel"),
      "One launch: stats_partials, and the last block of each channel tile does stats_finalize's work on it "
      "(same bits); scale / shift 0: not written; sem: >= C zeroed uint32 counters, zero again afterwards "
      "(fr_api.h).");

  m.def(
      "backward_partials",
      [](const fr::Launch& L, u dy, u x, u scale, u shift, u mean, u res, u xb, u scale_b, u shift_b, u mean_b,
         bool relu, u grad_res, u ws, std::int64_t ws_numel, int splits) {
        fr::backward_partials(L, ptr<const void>(dy), ptr<const void>(x), ptr<const float>(scale),
                              ptr<const float>(shift), ptr<const float>(mean), ptr<const void>(res),
                              ptr<const void>(xb), ptr<const float>(scale_b), ptr<const float>(shift_b),
                              ptr<const float>(mean_b), relu, ptr<void>(grad_res), ptr<float>(ws), ws_numel, splits);
      },
      py::arg("launch"), py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("mean"),
      py::arg("res"), py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"), py::arg("mean_b"), py::arg("relu"),
      py::arg("grad_res"), py::arg("ws"), py::arg("ws_numel"), py::arg("splits"),
      "One launch: the partial sums of backward_reduce into ws (and grad_res).");

  m.def(
      "backward_finalize",
      [](const fr::Launch& L, u ws, int splits, int mode_a, int mode_b, bool training, float count, u scale, u var,
         float eps, u scale_b, u var_b, float eps_b, std::array<u, 4> out_a, std::array<u, 4> out_b) {
        fr::BwdFinalizeArgs a;
        a.ws = ptr<const float>(ws);
        a.splits = splits;
        a.mode_a = mode_a;
        a.mode_b = mode_b;
        a.training = training;
        a.count = count;
        a.scale = ptr<const float>(scale);
        a.var = ptr<const float>(var);
        a.eps = eps;
        a.scale_b = ptr<const float>(scale_b);
        a.var_b = ptr<const float>(var_b);
        a.eps_b = eps_b;
        for (int i = 0; i < 4; ++i) {
          a.out_a[i] = ptr<float>(out_a[i]);
          a.out_b[i] = ptr<float>(out_b[i]);
        }
        fr::backward_finalize(L, a);
      },
      py::arg("launch"), py::arg("ws"), py::arg("splits"), py::arg("mode_a"), py::arg("mode_b"), py::arg("training"),
      py::arg("count"), py::arg("scale"), py::arg("var"), py::arg("eps"), py::arg("scale_b"), py::arg("var_b"),
      py::arg("eps_b"), py::arg("out_a"), py::arg("out_b"),
      "One launch: coefficients and parameter gradients per side from the backward partials (fr_finalize.h).");

  m.def(
      "backward_reduce_finalize",
      [](const fr::Launch& L, u dy, u x, u scale, u shift, u mean, u res, u xb, u scale_b, u shift_b, u mean_b,
         bool relu, u grad_res, u ws, std::int64_t ws_numel, int splits, int mode_a, int mode_b, bool training,
         float count, u var, float eps, u var_b, float eps_b, std::array<u, 4> out_a, std::array<u, 4> out_b, u sem,
         std::int64_t sem_numel) {
        fr::BwdFinalizeArgs a;
        a.mode_a = mode_a;
        a.mode_b = mode_b;
        a.training = training;
        a.count = count;
        a.var = ptr<const float>(var);
        a.eps = eps;
        a.var_b = ptr<const float>(var_b);
        a.eps_b = eps_b;
        for (int i = 0; i < 4; ++i) {
          a.out_a[i] = ptr<float>(out_a[i]);
          a.out_b[i] = ptr<float>(out_b[i]);
        }
        fr::backward_reduce_finalize(L, ptr<const void>(dy), ptr<const void>(x), ptr<const float>(scale),
                                     ptr<const float>(shift), ptr<const float>(mean), ptr<const void>(res),
                                     ptr<const void>(xb), ptr<const float>(scale_b), ptr<const float>(shift_b),
                                     ptr<const float>(mean_b), relu, ptr<void>(grad_res), ptr<float>(ws), ws_numel,
                                     splits, a, ptr<unsigned>(sem), sem_numel);
      },
      py::arg("launch"), py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("mean"),
      py::arg("res"), py::arg("xb"), py::arg("scale_b"), py::arg("shift_b"), py::arg("mean_b"), py::arg("relu"),
      py::arg("grad_res"), py::arg("ws"), py::arg("ws_numel"), py::arg("splits"), py::arg("mode_a"),
      py::arg("mode_b"), py::arg("training"), py::arg("count"), py::arg("var"), py::arg("eps"), py::arg("var_b"),
      py::arg("eps_b"), py::arg("out_a"), py::arg("out_b"), py::arg("sem"), py::arg("sem_numel"),
      "One launch: backward_partials, and the last block of each channel tile does backward_finalize's work on "
      "it (same bits); sem: >= C zeroed uint32 counters, zero again afterwards (fr_api.h).");

  m.def("build_info", &fr::build_info, "Compiled CUDA runtime version and architectures.");
  m.def("device_unsupported", &fr::device_unsupported, py::arg("device"),
        "Empty string when the kernels can run on this CUDA device, else the reason.");
}
