// CPU registration of the int8 Conv2d ops: the conv packed layout (cpu/conv_kernels.h), the input's quantisation
// (NHWC, per tensor, with the int8 table's quantize_rows), the task split, and the kernel tables of the ISA level in
// force. What the ops accept is glue/conv.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cpu/conv_kernels.h"
#include "cpu/task_runner.h"
#include "glue/conv.h"

namespace fastdistill::cpu::conv {
namespace {

using fastdistill::int8::float_dtype;
using int8::kNB;
using int8::kPanelBlocks;
using int8::kTileRows;
using int8::round_up;

ConvHeader read_header(const char* op, const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 1 && packed.is_contiguous(), "fastdistill.", op,
              ": w_packed must be a contiguous 1-D int8 tensor from fastdistill.int8_conv2d_pack_weight, got ",
              packed.scalar_type(), " of shape ", packed.sizes());
  ConvHeader h{};
  TORCH_CHECK(packed.numel() >= kHeaderBytes, "fastdistill.", op, ": w_packed is too small to be a packed conv weight (",
              packed.numel(), " bytes)");
  std::memcpy(&h, packed.data_ptr<int8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == kMagic && h.version == kVersion && h.cout > 0 && h.cin > 0 && h.kh > 0 && h.kw > 0 &&
                  (h.groups == 1 || (h.groups == h.cin && h.groups == h.cout)) &&
                  packed.numel() == packed_bytes(h.cout, h.cin, h.kh, h.kw, h.groups),
              "fastdistill.", op, ": w_packed is not a CPU packed conv weight (bad header or size); build it with "
              "fastdistill.int8_conv2d_pack_weight on the CPU");
  return h;
}

// Per-row grain of the quantisation pass.
int64_t row_grain(int64_t c) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)); }

at::Tensor int8_conv2d_pack_weight(const at::Tensor& w_in, int64_t groups) {
  const char* op = "int8_conv2d_pack_weight";
  TORCH_CHECK(w_in.dim() == 4 && w_in.scalar_type() == at::kChar, "fastdistill.", op,
              ": w_int8 must be an int8 [Cout, Cin / groups, kh, kw] tensor, got ", w_in.scalar_type(), " of shape ",
              w_in.sizes());
  const int64_t cout = w_in.size(0), cin_g = w_in.size(1), kh = w_in.size(2), kw = w_in.size(3);
  TORCH_CHECK(cout > 0 && cin_g > 0 && kh > 0 && kw > 0, "fastdistill.", op, ": w_int8 must not be empty, got shape ",
              w_in.sizes());
  TORCH_CHECK(groups == 1 || (groups == cout && cin_g == 1), "fastdistill.", op,
              ": groups must be 1 or depthwise (groups == Cout with one input channel per group), got groups=",
              groups, " for a weight of shape ", w_in.sizes());
  const int64_t cin = cin_g * groups;
  at::Tensor packed = at::zeros({packed_bytes(cout, cin, kh, kw, groups)}, w_in.options());
  ConvHeader h{kMagic, kVersion, cout, cin, kh, kw, groups};
  std::memcpy(packed.data_ptr<int8_t>(), &h, sizeof(h));
  int8_t* body = packed.data_ptr<int8_t>() + kHeaderBytes;
  if (groups == 1) {
    // [Cout, Cin, kh, kw] -> [Cout, kh, kw, cin_pad] (K ordered (kh, kw, cin)), then the int8 GEMM's packing.
    const int64_t cin_pad = round_up(cin, kCinAlign), k = gemm_k(cin, kh, kw);
    TORCH_CHECK(k <= int8::kMaxK, "fastdistill.", op, ": kh * kw * round_up(Cin, 4) must be at most ", int8::kMaxK,
                " (int32 accumulation of int8 products), got ", k);
    at::Tensor wk = at::zeros({cout, kh, kw, cin_pad}, w_in.options());
    wk.narrow(3, 0, cin).copy_(w_in.permute({0, 2, 3, 1}));
    wk = wk.reshape({cout, k});
    int8::write_header(body, cout, k);
    const int64_t nblocks = round_up(cout, kNB) / kNB;
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      int8::pack_blocks(wk.data_ptr<int8_t>(), k, cout, k, body, b0, b1);
    });
  } else {
    const int64_t c_pad = round_up(cout, kDwAlign);
    const at::Tensor w = w_in.contiguous();
    const int8_t* src = w.data_ptr<int8_t>();
    int32_t* dst = reinterpret_cast<int32_t*>(body);
    for (int64_t c = 0; c < cout; ++c)
      for (int64_t t = 0; t < kh * kw; ++t) dst[t * c_pad + c] = int32_t(uint16_t(int16_t(src[c * kh * kw + t])));
  }
  return packed;
}

at::Tensor int8_conv2d_unpack_weight(const at::Tensor& packed, at::IntArrayRef shape) {
  const char* op = "int8_conv2d_unpack_weight";
  const ConvHeader h = read_header(op, packed);
  const std::vector<int64_t> held{h.cout, h.cin / h.groups, h.kh, h.kw};
  TORCH_CHECK(shape.vec() == held, "fastdistill.", op, ": w_packed holds a ", at::IntArrayRef(held),
              " weight, but shape=", shape, " was given");
  const int8_t* body = packed.data_ptr<int8_t>() + kHeaderBytes;
  if (h.groups == 1) {  // the int8 GEMM's [Cout, K] rows, K ordered (kh, kw, cin_pad) -> [Cout, Cin, kh, kw]
    const int64_t k = gemm_k(h.cin, h.kh, h.kw);
    at::Tensor wk = at::empty({h.cout, k}, packed.options());
    at::parallel_for(0, h.cout, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
      int8::unpack_rows(body, wk.data_ptr<int8_t>(), r0, r1);
    });
    return wk.view({h.cout, h.kh, h.kw, round_up(h.cin, kCinAlign)}).narrow(3, 0, h.cin).permute({0, 3, 1, 2})
        .contiguous();
  }
  const int64_t c_pad = round_up(h.cout, kDwAlign), taps = h.kh * h.kw;
  at::Tensor w = at::empty(held, packed.options());
  const int32_t* src = reinterpret_cast<const int32_t*>(body);
  int8_t* dst = w.data_ptr<int8_t>();
  for (int64_t c = 0; c < h.cout; ++c)
    for (int64_t t = 0; t < taps; ++t) dst[c * taps + t] = int8_t(int16_t(uint16_t(src[t * c_pad + c])));
  return w;
}

at::Tensor int8_conv2d(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                       const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& x_scale,
                       const std::optional<at::Tensor>& residual_in, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       c10::string_view activation) {
  const char* op = "int8_conv2d";
  const fastdistill::conv::ConvGeometry g = fastdistill::conv::check_conv_inputs(
      op, x_in, packed, scales_in, bias_in, x_scale, kernel_size, stride, padding, dilation, groups);
  const Activation act = fastdistill::int8::parse_activation(op, activation, fastdistill::int8::kConvActivations);
  const ConvHeader h = read_header(op, packed);
  TORCH_CHECK(h.kh == g.kh && h.kw == g.kw && h.groups == g.groups, "fastdistill.", op, ": w_packed holds a ", h.kh,
              "x", h.kw, " kernel with groups=", h.groups, ", but kernel_size=", kernel_size, " groups=", groups,
              " were given");
  TORCH_CHECK(x_in.size(1) == h.cin, "fastdistill.", op, ": x must have C=", h.cin,
              " channels to match the weight, got ", x_in.size(1));
  TORCH_CHECK(scales_in.size(0) == h.cout, "fastdistill.", op, ": w_scales must have shape [Cout] = [", h.cout,
              "] to match the weight, got ", scales_in.sizes());
  fastdistill::int8::check_bias(op, bias_in, h.cout);
  const DType dt = float_dtype(op, "x", x_in);
  const int64_t n = x_in.size(0), hh = x_in.size(2), ww = x_in.size(3), c = h.cin;
  const std::vector<int64_t> out_shape{n, h.cout, g.oh, g.ow};
  fastdistill::conv::check_residual(op, residual_in, x_in, out_shape);
  at::Tensor out = at::empty(out_shape, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t m = n * g.oh * g.ow, pixels = n * hh * ww;
  if (m == 0) return out;

  // NHWC rows [pixels][c]: a channels_last input is read in place, any other layout is converted once.
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  float scale;
  if (x_scale.has_value()) {
    scale = x_scale->contiguous().data_ptr<float>()[0];
    TORCH_CHECK(std::isfinite(scale) && scale >= 0.f, "fastdistill.", op,
                ": x_scale must be finite and >= 0, got ", scale);
  } else {  // dynamic per tensor: s = amax / 127 over the whole input
    float amax = 0.f;
    if (pixels > 0) {
      auto [lo, hi] = at::aminmax(x);
      amax = std::max(-lo.to(at::kFloat).item<float>(), hi.to(at::kFloat).item<float>());
    }
    scale = amax / 127.f;
  }
  const bool depthwise = h.groups != 1;
  const int8::Int8Kernels& i8 = int8::int8_kernels_for_rows(std::min<int64_t>(m, kTileRows));
  const ConvKernels& kern = conv_kernels();
  const bool shifted = !depthwise && i8.u8_activations;
  const int64_t ldq = depthwise ? round_up(c, kDwAlign) : round_up(c, kCinAlign);

  // The quantised input, in the calling thread's scratch (kept at the largest size seen).
  thread_local std::vector<int8_t> qbuf;
  if (int64_t(qbuf.size()) < pixels * ldq) qbuf.resize(size_t(pixels * ldq));
  int8::QuantParams qp;
  qp.dtype = dt;
  qp.x = x.data_ptr();
  qp.rows = pixels;
  qp.ldx = qp.k = c;
  qp.k_pad = qp.ldq = ldq;
  qp.q = qbuf.data();
  qp.xor_mask = shifted ? 0x80 : 0;
  qp.fixed_scale = &scale;  // s = 0 (an all-zero input) quantises to 0
  const int64_t threads_q = threads_for_work(double(pixels) * double(c) * 0.25);
  at::parallel_for(0, pixels, threads_q > 1 ? row_grain(c) : pixels, [&](int64_t r0, int64_t r1) {
    i8.quantize_rows(qp, r0, r1);
  });

  const at::Tensor ws = scales_in.contiguous();
  at::Tensor bias, residual;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  if (residual_in.has_value()) residual = residual_in->contiguous(at::MemoryFormat::ChannelsLast);
  ConvParams p;
  p.n = n, p.h = hh, p.w = ww, p.c = c;
  p.oh = g.oh, p.ow = g.ow, p.cout = h.cout;
  p.kh = g.kh, p.kw = g.kw, p.sh = g.sh, p.sw = g.sw, p.ph = g.ph, p.pw = g.pw, p.dh = g.dh, p.dw = g.dw;
  p.q = qbuf.data();
  p.ldq = ldq;
  p.zero = shifted ? int8_t(-128) : int8_t(0);
  p.x_scale = scale;
  p.w_scales = ws.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = dt;
  p.act = act;
  const int8_t* body = packed.data_ptr<int8_t>() + kHeaderBytes;
  if (depthwise) {
    p.dw_w = reinterpret_cast<const int32_t*>(body);
    const int64_t tasks = (m + 15) / 16;  // 16 output pixels a task
    run_dynamic(tasks, double(m) * double(c) * double(g.kh * g.kw) * 4, [&](int64_t t) {
      kern.depthwise(p, t * 16, std::min(m, (t + 1) * 16));
    });
    return out;
  }
  const int64_t k = gemm_k(c, g.kh, g.kw), n_pad = round_up(h.cout, kNB);
  p.gemm = &i8;
  p.shifted = shifted;
  p.tiles = int8::packed_data(body, n_pad);
  p.comp = int8::packed_comp(body);
  p.k_pad = k;
  // Tasks: tiles of kTileRows output pixels (each packs its A rows once) x chunks of column panels. With fewer tiles
  // than twice the threads the panels are split too, so a small image still spreads; every output element belongs
  // to exactly one task, so the result does not depend on the thread count.
  const double work = double(m) * double(h.cout) * double(k);
  const int64_t threads = threads_for_work(work);
  const int64_t tiles = (m + kTileRows - 1) / kTileRows, nblocks = n_pad / kNB;
  const int64_t panels = (nblocks + kPanelBlocks - 1) / kPanelBlocks;
  const int64_t chunks = tiles >= 2 * threads ? 1 : std::min(panels, (2 * threads + tiles - 1) / tiles);
  const int64_t per_chunk = (panels + chunks - 1) / chunks;
  run_dynamic(tiles * chunks, work, [&](int64_t t) {
    const int64_t tile = t / chunks, chunk = t % chunks;
    const int64_t b0 = chunk * per_chunk * kPanelBlocks, b1 = std::min(nblocks, (chunk + 1) * per_chunk * kPanelBlocks);
    if (b0 < b1) kern.gemm_rows(p, tile * kTileRows, std::min(m, (tile + 1) * kTileRows), b0, b1);
  });
  return out;
}

}  // namespace
}  // namespace fastdistill::cpu::conv

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  using namespace fastdistill::cpu::conv;
  m.impl("int8_conv2d_pack_weight", &int8_conv2d_pack_weight);
  m.impl("int8_conv2d_unpack_weight", &int8_conv2d_unpack_weight);
  m.impl("int8_conv2d", &int8_conv2d);
}
