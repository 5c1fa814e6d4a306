// Gradient checks of a module: input gradient and every trainable parameter, in double.
#pragma once

#include <doctest/doctest.h>

#include <moca/moca.hpp>
#include <moca/nn/parameter.hpp>
#include <moca/testing/gradcheck.hpp>
#include <string>

namespace moca::test {

/// Gradients whose exact value is zero (the attention key bias) give pure roundoff in central
/// differences, about 1e-8 in unoptimised builds: the absolute tolerance sits above it.
inline testing::GradcheckOptions default_options() {
  testing::GradcheckOptions opt;
  opt.atol = 1e-7;
  return opt;
}

/// Loss <r, f(x)> for a fixed random r; checks d/dx (unless `check_input` is false) and d/dθ for
/// every trainable entry of `store`. `forward(x, y)` runs the module, `backward(x, dy, dx)`
/// backpropagates (accumulating parameter gradients).
template <class Fwd, class Bwd>
void check_module_gradients(ParameterStore<double>& store, const TensorView<double>& x,
                            Shape out_shape, Fwd&& forward, Bwd&& backward,
                            bool check_input = true,
                            testing::GradcheckOptions opt = default_options()) {
  Tensor<double> y(out_shape), r(out_shape), dx(x.shape());
  fill_uniform(r, Philox(99), 1, -1.0, 1.0);
  auto loss = [&] {
    forward(x, TensorView<double>(y));
    return testing::dot(TensorView<double>(r), TensorView<double>(y));
  };
  loss();
  store.zero_grad();
  backward(x, TensorView<double>(r), TensorView<double>(dx));
  Tensor<double> grads = Tensor<double>({store.num_trainable()});
  copy(store.grads(), TensorView<double>(grads));
  if (check_input) {
    const auto report = testing::gradcheck("input", x, dx, loss, opt);
    CHECK_MESSAGE(report.ok, report.message());
    CHECK(report.grad_norm > 0);  // a zero gradient would pass vacuously
  }
  for (const auto& e : store.entries()) {
    if (!e.trainable) continue;
    TensorView<double> value = store.view(e);
    TensorView<double> g(grads.data() + e.offset, e.shape);
    const auto report = testing::gradcheck(e.name, value, g, loss, opt);
    CHECK_MESSAGE(report.ok, report.message());
    CHECK_MESSAGE(report.grad_norm > 0, e.name, " has an all-zero gradient");
  }
}

}  // namespace moca::test
