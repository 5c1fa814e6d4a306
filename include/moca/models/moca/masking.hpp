// The two complementary masking rounds of MOCA (spec §2).
//
// Round 1 draws one random permutation s1 of the L patches per image row (argsort of uniform
// noise) and keeps its first lk1 entries visible; round 2 is derived from it so that its visible
// patches are disjoint from round 1's visible and masked-target patches, and both rounds predict
// the same masked positions Bm = s1[lk1:ld1]:
//   A = s1[:lk1], Bm = s1[lk1:ld1], R = s1[ld1:], Cv = R[:lk2],  s2 = (Cv, Bm, R[lk2:], A).
// Each round's encoder sees s_r[:lk_r]; its decoder works on s_r[:ld_r] (in that order).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/rng.hpp"
#include "moca/core/tensor.hpp"
#include "moca/ops/common.hpp"

namespace moca {

/// floor(L · (1 − ratio)) in double precision, as Python's int() of the reference (spec §2.1).
inline std::int64_t kept_length(std::int64_t L, double ratio) {
  return static_cast<std::int64_t>(static_cast<double>(L) * (1.0 - ratio));
}

/// Lengths of the two rounds: encoder-visible lk and decoder positions ld.
struct MaskLengths {
  std::int64_t lk[2];
  std::int64_t ld[2];

  /// From the encoder and decoder mask ratios of the two rounds (spec §0: 0.55/0.75, 0.35/0.55).
  static MaskLengths from_ratios(std::int64_t L, double enc0, double enc1, double dec0,
                                 double dec1) {
    MaskLengths m{{kept_length(L, enc0), kept_length(L, enc1)},
                  {kept_length(L, dec0), kept_length(L, dec1)}};
    m.validate(L);
    return m;
  }

  /// Checks the construction is possible: 0 < lk_r < ld_r ≤ L, and the rest after round 1's
  /// decoder positions holds round 2's visible set. Round 2 decodes s2[:ld2], which is exactly
  /// Cv ∪ Bm only when ld2 = lk2 + (ld1 − lk1), as for 196 patches (49 + 39 = 88); for the tiny
  /// preset (64 patches) it is Cv and the first 12 of the 13 shared positions, as in the
  /// reference implementation.
  void validate(std::int64_t L) const {
    for (int r = 0; r < 2; ++r)
      MOCA_CHECK(0 < lk[r] && lk[r] < ld[r] && ld[r] <= L, "masking: round ", r + 1,
                 " needs 0 < visible (", lk[r], ") < decoded (", ld[r], ") <= patches (", L,
                 ")");
    MOCA_CHECK(L - ld[0] >= lk[1], "masking: round 2 needs ", lk[1],
               " visible patches outside round 1's ", ld[0], " decoder positions, but only ",
               L - ld[0], " of ", L, " remain");
  }
};

/// The masks of one iteration for N image rows: s[r] is [N, L] (host), lengths per round.
struct MaskPlan {
  Tensor<Index> s[2];
  MaskLengths lengths;

  /// Patch ids visible to the encoder in round r, [N, lk_r] (copied out of the longer rows).
  void visible(int r, Tensor<Index>& out) const { prefix(r, lengths.lk[r], out); }
  /// Patch ids the decoder works on in round r, in order: [N, ld_r].
  void decoded(int r, Tensor<Index>& out) const { prefix(r, lengths.ld[r], out); }

 private:
  void prefix(int r, std::int64_t len, Tensor<Index>& out) const {
    const std::int64_t N = s[r].size(0), L = s[r].size(1);
    out.resize({N, len});
    for (std::int64_t n = 0; n < N; ++n)
      std::copy_n(s[r].data() + n * L, len, out.data() + n * len);
  }
};

/// Derives round 2 from round 1's permutations s1 [N, L] (spec §2.2).
inline MaskPlan complementary_masks(Tensor<Index> s1, const MaskLengths& m) {
  MOCA_CHECK(s1.rank() == 2, "masking: permutations must be [N, L], got ", s1.shape());
  const std::int64_t N = s1.size(0), L = s1.size(1);
  m.validate(L);
  MaskPlan plan;
  plan.lengths = m;
  plan.s[1] = Tensor<Index>({N, L});
  std::vector<char> seen(static_cast<std::size_t>(L));
  for (std::int64_t n = 0; n < N; ++n) {
    const Index* a = s1.data() + n * L;
    std::fill(seen.begin(), seen.end(), 0);
    for (std::int64_t i = 0; i < L; ++i) {
      MOCA_CHECK(a[i] >= 0 && a[i] < L && !seen[static_cast<std::size_t>(a[i])],
                 "masking: row ", n, " of s1 is not a permutation of 0..", L - 1);
      seen[static_cast<std::size_t>(a[i])] = 1;
    }
    Index* b = plan.s[1].data() + n * L;
    const std::int64_t lk1 = m.lk[0], ld1 = m.ld[0], lk2 = m.lk[1];
    std::int64_t o = 0;
    for (std::int64_t i = ld1; i < ld1 + lk2; ++i) b[o++] = a[i];  // Cv
    for (std::int64_t i = lk1; i < ld1; ++i) b[o++] = a[i];        // Bm
    for (std::int64_t i = ld1 + lk2; i < L; ++i) b[o++] = a[i];    // rest of R
    for (std::int64_t i = 0; i < lk1; ++i) b[o++] = a[i];          // A
  }
  plan.s[0] = std::move(s1);
  return plan;
}

/// Round-1 permutations from the counter-based RNG: row n is the argsort of L uniforms drawn
/// from stream (step, n), so masks depend only on (seed, step, row).
inline Tensor<Index> random_permutations(const Philox& rng, std::uint64_t step, std::int64_t N,
                                         std::int64_t L) {
  Tensor<Index> s({N, L});
  std::vector<std::pair<double, Index>> keyed(static_cast<std::size_t>(L));
  for (std::int64_t n = 0; n < N; ++n) {
    const std::uint64_t stream = (step << 20) ^ static_cast<std::uint64_t>(n) ^ 0x6d61736bull;
    for (std::int64_t l = 0; l < L; ++l)
      keyed[static_cast<std::size_t>(l)] = {rng.uniform_double(stream, static_cast<std::uint64_t>(l)),
                                            static_cast<Index>(l)};
    std::sort(keyed.begin(), keyed.end());
    for (std::int64_t l = 0; l < L; ++l) s(n, l) = keyed[static_cast<std::size_t>(l)].second;
  }
  return s;
}

}  // namespace moca
