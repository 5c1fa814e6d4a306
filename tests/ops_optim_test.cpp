// ops::adamw over several steps against a double loop of torch.optim.AdamW semantics.
#include <array>
#include <string>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

TEST_CASE_TEMPLATE("adamw follows torch.optim.AdamW over several steps", T, float, double) {
  struct Hyper {
    double lr, beta1, beta2, eps, wd;
    int steps;
  };
  const std::array<Hyper, 3> hypers = {{{1e-2, 0.9, 0.999, 1e-8, 0.1, 5},
                                        {3e-3, 0.8, 0.95, 1e-6, 0.0, 7},
                                        {0.1, 0.5, 0.9, 1e-3, 0.5, 3}}};
  std::uint64_t stream = 1;
  for (const Hyper& h : hypers)
    for (i64 n : {1, 3, 7, 33, 65, 257, 65537}) {
      auto p = uniform<T>({n}, stream++);
      Tensor<T> m({n}), v({n});
      Vec pr = to_vec<T>(p), mr(static_cast<std::size_t>(n), 0.0), vr = mr;
      const Vec p0 = pr;
      for (int t = 1; t <= h.steps; ++t) {
        // A fresh gradient every step; the moments carry over.
        auto g = uniform<T>({n}, 1000 + static_cast<std::uint64_t>(t));
        ops::adamw(p, g, m, v, {h.lr, h.beta1, h.beta2, h.eps, h.wd, t});
        ref::adamw(pr, to_vec<T>(g), mr, vr, h.lr, h.beta1, h.beta2, h.eps, h.wd, t);
      }
      const std::string what = detail::str("adamw lr=", h.lr, " wd=", h.wd, " n=", n);
      check_close(what + " p", p, pr);
      check_close(what + " m", m, mr);
      check_close(what + " v", v, vr);
      // The parameters moved far beyond the tolerance: a no-op update cannot pass.
      double moved = 0;
      for (std::size_t i = 0; i < pr.size(); ++i) moved = std::max(moved, std::abs(pr[i] - p0[i]));
      CHECK(moved > 1e-3);
    }
}

TEST_CASE_TEMPLATE("adamw: the first step has its closed form", T, float, double) {
  // Step 1: m̂ = g and v̂ = g², so p1 = p0 · (1 − lr · wd) − lr · g / (|g| + eps); the decay
  // scales p0 before the Adam step is subtracted (decoupled, as in PyTorch).
  Tensor<T> p({2}), g({2}), m({2}), v({2});
  p(0) = 1, p(1) = -2;
  g(0) = 0.5, g(1) = -0.25;
  ops::adamw(p, g, m, v, {0.1, 0.9, 0.999, 1e-3, 0.5, 1});
  check_close("adamw step 1", p,
              {1.0 * (1 - 0.05) - 0.1 * 0.5 / (0.5 + 1e-3),
               -2.0 * (1 - 0.05) + 0.1 * 0.25 / (0.25 + 1e-3)});
  check_close("adamw step 1 m", m, {0.05, -0.025});
  check_close("adamw step 1 v", v, {0.001 * 0.25, 0.001 * 0.0625});
}

TEST_CASE("adamw rejects mismatched buffers and step 0") {
  Tensor<float> p({3, 4}), g({12}), bad({4, 4});
  ops::adamw(p, g, g.clone(), g.clone(), {});  // sizes match: accepted
  check_error_names("adamw g", [&] { ops::adamw(p, bad, g, g, {}); }, {"adamw", "[3, 4]", "[4, 4]"});
  check_error_names("adamw m", [&] { ops::adamw(p, g, bad, g, {}); }, {"adamw", "[3, 4]", "[4, 4]"});
  check_error_names("adamw v", [&] { ops::adamw(p, g, g, bad, {}); }, {"adamw", "[3, 4]", "[4, 4]"});
  ops::AdamWStep s;
  s.step = 0;
  check_error_names("adamw step 0", [&] { ops::adamw(p, g, g, g, s); }, {"adamw", "step", "0"});
}
