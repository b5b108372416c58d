// CPU kernel of the blocked contextual attention's fused, masked and scaled scores
// (fastinpaint/models/contextual_attention.py, "Blocked form"), for calls without gradients.
//
//   contextual_fuse_scores(t, rows, offs, spans, wrap_ptr, wrap_dst, wrap_src, valid, scale,
//                          masking) -> s
//
// t (B, |N|, L): the raw scores of the tile's shifted queries N against every key. For each
// fuse shift k (k = 0 the identity) and tile query j, rows[k, j] is the row of t holding
// t_k(j) (negative or >= |N|: the shift leaves the map, no term); the shift maps keys
// [spans[k, 0], spans[k, 1]) to key + offs[k], and keys wrap_dst[p] to wrap_src[p] (negative:
// no term) for p in [wrap_ptr[k], wrap_ptr[k + 1]). Then
//
//   fused[b, j, i] = sum_k t[b, rows[k, j], t_k(i)]
//   s = fused * scale where the key is valid, 0 elsewhere        (masking 0, "official")
//   s = fused * scale where the key is valid, lowest() elsewhere (masking 1, "exclude")
//
// the same sums, in the same order, as the Python loop over row runs and shifts; here each
// output row is built in one pass while its nine source rows are in cache, where the loop
// makes a pass over the whole tile per shift. One task per block of (sample, query) rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "cpu/cpu_common.h"

namespace fastinpaint {
namespace {

template <typename T>
void fuse_rows(const T* t, const int64_t* rows, const int64_t* offs, const int64_t* spans, const int64_t* wrap_ptr,
               const int64_t* wrap_dst, const int64_t* wrap_src, const bool* valid, double scale, int64_t masking,
               int64_t B, int64_t n_rows, int64_t L, int64_t S, int64_t J, T* out) {
  const T sc = static_cast<T>(scale);
  const T outside = masking == 0 ? T(0) : std::numeric_limits<T>::lowest();
  parallel_for(0, B * J, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / J, j = task % J;
      T* __restrict__ o = out + task * L;
      const T* tb = t + b * n_rows * L;
      std::copy(tb + rows[j] * L, tb + rows[j] * L + L, o);  // shift 0: the identity, every key
      for (int64_t k = 1; k < S; ++k) {
        const int64_t r = rows[k * J + j];
        if (r < 0 || r >= n_rows) {
          continue;
        }
        const T* __restrict__ src = tb + r * L;
        const int64_t a = spans[2 * k], e = spans[2 * k + 1], off = offs[k];
        const T* __restrict__ shifted = src + off;
        for (int64_t i = a; i < e; ++i) {
          o[i] += shifted[i];
        }
        for (int64_t p = wrap_ptr[k]; p < wrap_ptr[k + 1]; ++p) {
          if (wrap_src[p] >= 0) {
            o[wrap_dst[p]] += src[wrap_src[p]];
          }
        }
      }
      const bool* v = valid + b * L;
      for (int64_t i = 0; i < L; ++i) {
        o[i] = v[i] ? o[i] * sc : outside;
      }
    }
  });
}

at::Tensor contextual_fuse_scores_cpu(const at::Tensor& t_, const at::Tensor& rows_, const at::Tensor& offs_,
                                      const at::Tensor& spans_, const at::Tensor& wrap_ptr_,
                                      const at::Tensor& wrap_dst_, const at::Tensor& wrap_src_,
                                      const at::Tensor& valid_, double scale, int64_t masking) {
  TORCH_CHECK(t_.dim() == 3, "fastinpaint: t must be (B, |N|, L), got ", t_.sizes());
  TORCH_CHECK(t_.scalar_type() == at::kFloat || t_.scalar_type() == at::kDouble,
              "fastinpaint: t must be float32 or float64, got ", t_.scalar_type());
  TORCH_CHECK(masking == 0 || masking == 1, "fastinpaint: masking must be 0 (official) or 1 (exclude), got ",
              masking);
  const int64_t B = t_.size(0), n_rows = t_.size(1), L = t_.size(2);
  TORCH_CHECK(rows_.dim() == 2 && rows_.size(0) >= 1, "fastinpaint: rows must be (S, J), got ", rows_.sizes());
  const int64_t S = rows_.size(0), J = rows_.size(1);
  for (const auto* p : {&rows_, &offs_, &spans_, &wrap_ptr_, &wrap_dst_, &wrap_src_}) {
    TORCH_CHECK(p->scalar_type() == at::kLong && p->device().is_cpu(), "fastinpaint: the plan's tensors must be "
                "int64 CPU tensors");
  }
  TORCH_CHECK(offs_.numel() == S && spans_.numel() == 2 * S && wrap_ptr_.numel() == S + 1 &&
                  wrap_dst_.numel() == wrap_src_.numel(),
              "fastinpaint: the plan's sizes disagree with rows' ", S, " shifts");
  TORCH_CHECK(valid_.dim() == 2 && valid_.size(0) == B && valid_.size(1) == L && valid_.scalar_type() == at::kBool,
              "fastinpaint: valid must be (B, L) = (", B, ", ", L, ") bool, got ", valid_.sizes(), " ",
              valid_.scalar_type());
  const at::Tensor t = t_.contiguous(), rows = rows_.contiguous(), offs = offs_.contiguous();
  const at::Tensor spans = spans_.contiguous(), wrap_ptr = wrap_ptr_.contiguous();
  const at::Tensor wrap_dst = wrap_dst_.contiguous(), wrap_src = wrap_src_.contiguous(), valid = valid_.contiguous();
  // the plan is trusted to stay inside t (it comes from the module's own geometry), but a
  // wrong one must not write outside the output: checked once here
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < J; ++j) {
    TORCH_CHECK(rp[j] >= 0 && rp[j] < n_rows, "fastinpaint: rows of the identity shift (rows[0]) must lie in [0, ",
                n_rows, ")");
  }
  const int64_t* pp = wrap_ptr.data_ptr<int64_t>();
  for (int64_t k = 0; k < S; ++k) {
    TORCH_CHECK(pp[0] == 0 && pp[k] <= pp[k + 1] && pp[S] == wrap_dst_.numel(),
                "fastinpaint: wrap_ptr must rise from 0 to the wrapped keys' count");
  }
  const int64_t* sp = spans.data_ptr<int64_t>();
  const int64_t* op = offs.data_ptr<int64_t>();
  for (int64_t k = 0; k < S; ++k) {
    TORCH_CHECK(sp[2 * k] >= 0 && sp[2 * k + 1] <= L && (sp[2 * k] >= sp[2 * k + 1] ||
                (sp[2 * k] + op[k] >= 0 && sp[2 * k + 1] + op[k] <= L)),
                "fastinpaint: shift ", k, "'s key span leaves the map");
  }
  const int64_t* wd = wrap_dst.data_ptr<int64_t>();
  const int64_t* ws = wrap_src.data_ptr<int64_t>();
  for (int64_t p = 0; p < wrap_dst.numel(); ++p) {
    TORCH_CHECK(wd[p] >= 0 && wd[p] < L && ws[p] < L, "fastinpaint: a wrapped key leaves the map");
  }
  at::Tensor out = new_output({B, J, L}, t.options(), at::MemoryFormat::Contiguous);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "contextual_fuse_scores", [&] {
    fuse_rows<scalar_t>(t.data_ptr<scalar_t>(), rp, op, sp, wrap_ptr.data_ptr<int64_t>(), wd, ws,
                        valid.data_ptr<bool>(), scale, masking, B, n_rows, L, S, J, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) { m.impl("contextual_fuse_scores", &contextual_fuse_scores_cpu); }

}  // namespace fastinpaint
