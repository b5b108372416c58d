// CPU kernels of pixel attention and of the attention-transfer loss (DGII, Suin et al. 2021).
//
// Both are computed in tasks of (sample, block of kBlock rows) against all N keys: the
// largest temporary of a task is a (kBlock, N) score block, never the (N, N) matrix, so the
// memory is O(threads * kBlock * N) on top of the inputs (and, in backward, the gradient
// accumulators: O((B + threads) * N * D)). Tasks run in parallel
// (parallel_for, cpu/cpu_common.h); inside a task the block products (at::mm) and the softmax are ATen ops
// that run on the calling thread. Each backward is one pass over query blocks: a block's
// recomputed probabilities and dS give its rows of dq and its share of dk (and dv), added into
// the thread's own accumulators (Accumulators: the samples its tasks touch), summed in a fixed
// order at the end; recomputing the scores transposed in a second pass over key blocks, to
// write dk without a reduction, would cost two more block products of every block.
// float16/bfloat16 inputs are computed in float32, float64 in float64.
//
// pixel_attention_forward(q, k, v, key_mask?, scale) -> (out, lse)
//   out_i = sum_j softmax_j(scale q_i.k_j) v_j over keys with key_mask false;
//   lse_i = log sum_j exp(scale q_i.k_j); a sample with every key masked: out = 0, lse = +inf.
// pixel_attention_backward(grad_out, q, k, v, key_mask?, out, lse, scale) -> (dq, dk, dv)
//   p = exp(s - lse), delta_i = sum_d dO_id O_id, dS = p (dO V^T - delta),
//   dq = scale dS K (query blocks), dk = scale dS^T Q, dv = p^T dO (key blocks).
// attention_transfer_forward(q_s, k_s, q_t, k_t, scale, distance) -> (dist, lse_s, lse_t, c)
//   r = softmax rows; dist_i = sum_j (r_s - r_t)^2 (distance 0) or |r_s - r_t| (1);
//   c_i = sum_j r_s g with g = 2 (r_s - r_t) or sign(r_s - r_t).
// attention_transfer_backward(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, c, scale, distance)
//   -> (dq_s, dk_s): dS = gd_i r_s (g - c_i), dq_s = scale dS k_s, dk_s = scale dS^T q_s, in
//   one pass over query blocks (dk_s summed from per-chunk accumulators).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace fastinpaint {
namespace {

constexpr int64_t kBlock = 64;

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

void check_qkv(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "fastinpaint: ", name, " must be 3-D (B, N, D), got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), "fastinpaint: ", name, " must be a CPU tensor, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "fastinpaint: ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t N) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == N, "fastinpaint: ", name,
              " must have shape (B, N) = (", B, ", ", N, "), got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "fastinpaint: ", name, " must be a CPU tensor, got ", t.device());
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_mask) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  check_qkv(v, "v");
  TORCH_CHECK(k.sizes() == q.sizes(), "fastinpaint: k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1), "fastinpaint: v must have shape (",
              q.size(0), ", ", q.size(1), ", Dv), got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastinpaint: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  if (key_mask.has_value()) {
    check_rows(*key_mask, "key_mask", q.size(0), q.size(1));
    TORCH_CHECK(key_mask->scalar_type() == at::kBool, "fastinpaint: key_mask must be bool, got ",
                key_mask->scalar_type());
  }
}

// Per-sample key masks: which samples have no valid key, and the (N,) excluded mask of the
// others (undefined when nothing is excluded). Read once, before the parallel loops.
struct SampleMasks {
  std::vector<char> empty;
  std::vector<at::Tensor> excluded;
};

SampleMasks sample_masks(const std::optional<at::Tensor>& key_mask, int64_t B) {
  SampleMasks m{std::vector<char>(B, 0), std::vector<at::Tensor>(B)};
  if (!key_mask.has_value()) return m;
  const at::Tensor all = key_mask->all(1), any = key_mask->any(1);
  for (int64_t b = 0; b < B; ++b) {
    m.empty[b] = all[b].item<bool>();
    if (!m.empty[b] && any[b].item<bool>()) m.excluded[b] = (*key_mask)[b].contiguous();
  }
  return m;
}

// Tasks = (sample, block of kBlock rows), run by parallel_for; inside a task every ATen op
// (and BLAS) runs on the calling thread, so tasks never wait on each other.
template <typename F>
void for_blocks(int64_t B, int64_t N, const F& f) {
  const int64_t nb = (N + kBlock - 1) / kBlock;
  parallel_for(0, B * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nb, i0 = (t % nb) * kBlock;
      f(b, i0, std::min(kBlock, N - i0));
    }
  });
}

// Backward passes that reduce over query blocks: the (sample, block) tasks split into at most
// one contiguous range per thread (a chunk); each chunk adds into its own zeroed (samples it
// touches, N, D) accumulators, and Accumulators::sum adds them up in chunk order, so the
// result depends on the thread count only, not on scheduling.
struct Chunks {
  int64_t nb, tasks, count;
  Chunks(int64_t B, int64_t N)
      : nb((N + kBlock - 1) / kBlock),
        tasks(B * nb),
        count(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * nb))) {}
  int64_t first(int64_t c) const { return tasks * c / count; }
  int64_t end(int64_t c) const { return tasks * (c + 1) / count; }
  int64_t b_lo(int64_t c) const { return first(c) / nb; }
  int64_t samples(int64_t c) const { return end(c) > first(c) ? (end(c) - 1) / nb - b_lo(c) + 1 : 0; }
};

struct Accumulators {
  const Chunks& chunks;
  std::vector<at::Tensor> parts;
  Accumulators(const Chunks& ch, int64_t N, int64_t D, const at::TensorOptions& opts) : chunks(ch) {
    for (int64_t c = 0; c < ch.count; ++c) parts.push_back(at::zeros({ch.samples(c), N, D}, opts));
  }
  // the (N, D) accumulator of sample b in chunk c
  at::Tensor at(int64_t c, int64_t b) const { return parts[c][b - chunks.b_lo(c)]; }
  at::Tensor sum(int64_t B, at::ScalarType dtype) const {
    at::Tensor out = at::zeros({B, parts[0].size(1), parts[0].size(2)}, parts[0].options());
    for (int64_t c = 0; c < chunks.count; ++c) {
      if (parts[c].size(0) > 0) out.narrow(0, chunks.b_lo(c), parts[c].size(0)).add_(parts[c]);
    }
    return out.to(dtype);
  }
};

// f(chunk, b, i0, n) for every (sample, block of rows) task, chunk by chunk in parallel.
template <typename F>
void for_chunked_blocks(const Chunks& chunks, int64_t N, const F& f) {
  parallel_for(0, chunks.count, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t t = chunks.first(c); t < chunks.end(c); ++t) {
        const int64_t b = t / chunks.nb, i0 = (t % chunks.nb) * kBlock;
        f(c, b, i0, std::min(kBlock, N - i0));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v,
                                                               const std::optional<at::Tensor>& key_mask,
                                                               double scale) {
  check_attention(q, k, v, key_mask);
  const int64_t B = q.size(0), N = q.size(1), Dv = v.size(2);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out = new_output({B, N, Dv}, q.options(), at::MemoryFormat::Contiguous);
  at::Tensor lse = new_output({B, N}, q.options().dtype(acc), at::MemoryFormat::Contiguous);
  const double inf = std::numeric_limits<double>::infinity();
  const SampleMasks masks = sample_masks(key_mask, B);
  const at::Tensor qa = q.to(acc), kt = k.to(acc).transpose(1, 2).contiguous(), va = v.to(acc).contiguous();
  for_blocks(B, N, [&](int64_t b, int64_t i0, int64_t n) {
    if (masks.empty[b]) {  // no valid key: zero output, lse = +inf
      out[b].narrow(0, i0, n).zero_();
      lse[b].narrow(0, i0, n).fill_(inf);
      return;
    }
    at::Tensor s = at::mm(qa[b].narrow(0, i0, n), kt[b]).mul_(scale);  // (n, N)
    if (masks.excluded[b].defined()) s.masked_fill_(masks.excluded[b].unsqueeze(0), -inf);
    at::Tensor m = std::get<0>(s.max(1, /*keepdim=*/true));
    s.sub_(m).exp_();
    at::Tensor l = s.sum(1, /*keepdim=*/true);
    out[b].narrow(0, i0, n).copy_(at::mm(s, va[b]).div_(l));
    lse[b].narrow(0, i0, n).copy_(m.add_(l.log_()).squeeze(1));
  });
  return {out, lse};
}

// Backward in one parallel pass over query blocks (file comment).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_mask, const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention(q, k, v, key_mask);
  const int64_t B = q.size(0), N = q.size(1), Dqk = q.size(2), Dv = v.size(2);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == N && grad_out.size(2) == Dv,
              "fastinpaint: grad_out must have shape (", B, ", ", N, ", ", Dv, "), got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "fastinpaint: out must have shape ", grad_out.sizes(),
              ", got ", out.sizes());
  check_rows(lse, "lse", B, N);
  TORCH_CHECK(grad_out.device().is_cpu() && out.device().is_cpu(),
              "fastinpaint: grad_out and out must be CPU tensors");
  const auto acc = acc_type(q.scalar_type());
  at::Tensor dq = new_output({B, N, Dqk}, q.options(), at::MemoryFormat::Contiguous);
  at::Tensor dk = new_output({B, N, Dqk}, q.options(), at::MemoryFormat::Contiguous);
  at::Tensor dv = new_output({B, N, Dv}, q.options(), at::MemoryFormat::Contiguous);
  const double inf = std::numeric_limits<double>::infinity();
  const SampleMasks masks = sample_masks(key_mask, B);
  const at::Tensor qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  const at::Tensor go = grad_out.to(acc).contiguous();
  const at::Tensor delta = (go * out.to(acc)).sum(2);  // (B, N)
  const at::Tensor lsea = lse.to(acc).contiguous();
  at::Tensor dq_a = q.scalar_type() == acc ? dq : at::empty({B, N, Dqk}, q.options().dtype(acc));
  const Chunks chunks(B, N);
  const Accumulators dk_acc(chunks, N, Dqk, qa.options()), dv_acc(chunks, N, Dv, qa.options());
  for_chunked_blocks(chunks, N, [&](int64_t c, int64_t b, int64_t i0, int64_t n) {
    at::Tensor dq_rows = dq_a[b].narrow(0, i0, n);
    if (masks.empty[b]) {  // the output is 0 whatever q, k, v are
      dq_rows.zero_();
      return;
    }
    const at::Tensor q_rows = qa[b].narrow(0, i0, n), go_rows = go[b].narrow(0, i0, n);
    at::Tensor p = at::mm(q_rows, ka[b].t()).mul_(scale);  // (n, N)
    if (masks.excluded[b].defined()) p.masked_fill_(masks.excluded[b].unsqueeze(0), -inf);
    p.sub_(lsea[b].narrow(0, i0, n).unsqueeze(1)).exp_();
    dv_acc.at(c, b).addmm_(p.t(), go_rows);
    // dS = p (dO V^T - delta), times the scale of the scores
    at::Tensor ds = at::mm(go_rows, va[b].t()).sub_(delta[b].narrow(0, i0, n).unsqueeze(1)).mul_(p).mul_(scale);
    at::mm_out(dq_rows, ds, ka[b]);
    dk_acc.at(c, b).addmm_(ds.t(), q_rows);
  });
  if (!dq_a.is_same(dq)) dq.copy_(dq_a);
  dk.copy_(dk_acc.sum(B, acc));
  dv.copy_(dv_acc.sum(B, acc));
  return {dq, dk, dv};
}

void check_transfer(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                    int64_t distance) {
  check_qkv(q_s, "q_s");
  check_qkv(k_s, "k_s");
  check_qkv(q_t, "q_t");
  check_qkv(k_t, "k_t");
  TORCH_CHECK(k_s.sizes() == q_s.sizes(), "fastinpaint: k_s must have the shape of q_s ", q_s.sizes(),
              ", got ", k_s.sizes());
  TORCH_CHECK(k_t.sizes() == q_t.sizes(), "fastinpaint: k_t must have the shape of q_t ", q_t.sizes(),
              ", got ", k_t.sizes());
  TORCH_CHECK(q_t.size(0) == q_s.size(0) && q_t.size(1) == q_s.size(1),
              "fastinpaint: q_t must have the (B, N) of q_s, got ", q_t.sizes(), " and ", q_s.sizes());
  TORCH_CHECK(distance == 0 || distance == 1, "fastinpaint: distance must be 0 (l2) or 1 (l1), got ",
              distance);
}

// Softmax rows of one block, student and teacher, and the distance's derivative g.
struct TransferBlock {
  at::Tensor ps, pt, g;
};

// Rows of exp(s - lse) from the (n, N) scores s (overwritten): lse given (backward), or
// computed and returned through *lse_out (forward, lse_out non-null).
at::Tensor softmax_rows(at::Tensor s, const at::Tensor& lse, at::Tensor* lse_out) {
  if (lse_out != nullptr) {
    at::Tensor m = std::get<0>(s.max(1, /*keepdim=*/true));
    s.sub_(m).exp_();
    at::Tensor l = s.sum(1, /*keepdim=*/true);
    s.div_(l);
    *lse_out = m.add_(l.log_());
    return s;
  }
  return s.sub_(lse).exp_();
}

// qs, qt: (n, D) rows already multiplied by the scale; ks, kt: (N, D).
TransferBlock transfer_block(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                             const at::Tensor& kt, const at::Tensor& lse_s, const at::Tensor& lse_t,
                             int64_t distance, at::Tensor* lse_s_out = nullptr, at::Tensor* lse_t_out = nullptr) {
  TransferBlock r;
  r.ps = softmax_rows(at::mm(qs, ks.t()), lse_s, lse_s_out);
  r.pt = softmax_rows(at::mm(qt, kt.t()), lse_t, lse_t_out);
  at::Tensor diff = r.ps - r.pt;
  r.g = distance == 0 ? diff.mul_(2) : diff.sign_();
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_transfer_forward_cpu(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t, double scale,
    int64_t distance) {
  check_transfer(q_s, k_s, q_t, k_t, distance);
  const int64_t B = q_s.size(0), N = q_s.size(1);
  const auto acc = acc_type(q_s.scalar_type());
  const auto opts = q_s.options().dtype(acc);
  at::Tensor dist = new_output({B, N}, opts, at::MemoryFormat::Contiguous);
  at::Tensor lse_s = new_output({B, N}, opts, at::MemoryFormat::Contiguous);
  at::Tensor lse_t = new_output({B, N}, opts, at::MemoryFormat::Contiguous);
  at::Tensor crow = new_output({B, N}, opts, at::MemoryFormat::Contiguous);
  // the scale folded into the queries once (the score blocks need no pass of their own)
  const at::Tensor qs_a = q_s.to(acc).mul(scale), qt_a = q_t.to(acc).mul(scale);
  const at::Tensor ks_a = k_s.to(acc).contiguous(), kt_a = k_t.to(acc).contiguous();
  const at::Tensor none;
  for_blocks(B, N, [&](int64_t b, int64_t i0, int64_t n) {
    at::Tensor ls, lt;
    TransferBlock r = transfer_block(qs_a[b].narrow(0, i0, n), ks_a[b], qt_a[b].narrow(0, i0, n), kt_a[b], none,
                                     none, distance, &ls, &lt);
    // dist_i = sum_j d(r_s - r_t) and c_i = sum_j g r_s, each one pass over the block
    at::Tensor dn = dist[b].narrow(0, i0, n), cn = crow[b].narrow(0, i0, n);
    if (distance == 0) {
      at::linalg_vector_norm_out(dn, r.g, 2, {1}).square_().mul_(0.25);   // g = 2 (r_s - r_t)
    } else {
      at::Tensor diff = r.ps - r.pt;
      at::sum_out(dn, diff.abs_(), {1});
    }
    at::sum_out(cn, r.g.mul_(r.ps), {1});
    lse_s[b].narrow(0, i0, n).copy_(ls.squeeze(1));
    lse_t[b].narrow(0, i0, n).copy_(lt.squeeze(1));
  });
  return {dist, lse_s, lse_t, crow};
}

// Backward in one parallel pass over query blocks (file comment): dq_s = dS k_s, dk_s += dS^T q_s.
std::tuple<at::Tensor, at::Tensor> attention_transfer_backward_cpu(
    const at::Tensor& grad_dist, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
    const at::Tensor& k_t, const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& crow, double scale,
    int64_t distance) {
  check_transfer(q_s, k_s, q_t, k_t, distance);
  const int64_t B = q_s.size(0), N = q_s.size(1), Ds = q_s.size(2);
  check_rows(grad_dist, "grad_dist", B, N);
  check_rows(lse_s, "lse_s", B, N);
  check_rows(lse_t, "lse_t", B, N);
  check_rows(crow, "c", B, N);
  const auto acc = acc_type(q_s.scalar_type());
  at::Tensor dq = new_output({B, N, Ds}, q_s.options(), at::MemoryFormat::Contiguous);
  at::Tensor dq_a = q_s.scalar_type() == acc ? dq : at::empty({B, N, Ds}, q_s.options().dtype(acc));
  const at::Tensor qs_raw = q_s.to(acc).contiguous();
  const at::Tensor qs_a = qs_raw.mul(scale), qt_a = q_t.to(acc).mul(scale);
  const at::Tensor ks_a = k_s.to(acc).contiguous(), kt_a = k_t.to(acc).contiguous();
  const at::Tensor gd = grad_dist.to(acc).contiguous(), cr = crow.to(acc).contiguous();
  const at::Tensor ls = lse_s.to(acc).contiguous(), lt = lse_t.to(acc).contiguous();
  const Chunks chunks(B, N);
  const Accumulators dk_acc(chunks, N, Ds, qs_a.options());
  for_chunked_blocks(chunks, N, [&](int64_t c, int64_t b, int64_t i0, int64_t n) {
    TransferBlock r = transfer_block(qs_a[b].narrow(0, i0, n), ks_a[b], qt_a[b].narrow(0, i0, n), kt_a[b],
                                     ls[b].narrow(0, i0, n).unsqueeze(1), lt[b].narrow(0, i0, n).unsqueeze(1),
                                     distance);
    // dS = gd_i r_s (g - c_i), times the scale of the scores
    at::Tensor ds = r.g.sub_(cr[b].narrow(0, i0, n).unsqueeze(1))
                        .mul_(r.ps)
                        .mul_(gd[b].narrow(0, i0, n).unsqueeze(1).mul(scale));
    at::Tensor dq_rows = dq_a[b].narrow(0, i0, n);
    at::mm_out(dq_rows, ds, ks_a[b]);
    dk_acc.at(c, b).addmm_(ds.t(), qs_raw[b].narrow(0, i0, n));
  });
  if (!dq_a.is_same(dq)) dq.copy_(dq_a);
  return {dq, dk_acc.sum(B, q_s.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinpaint, CPU, m) {
  m.impl("pixel_attention_forward", &pixel_attention_forward_cpu);
  m.impl("pixel_attention_backward", &pixel_attention_backward_cpu);
  m.impl("attention_transfer_forward", &attention_transfer_forward_cpu);
  m.impl("attention_transfer_backward", &attention_transfer_backward_cpu);
}

}  // namespace fastinpaint
