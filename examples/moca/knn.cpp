// `moca knn`: see knn.hpp.
#include "knn.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <moca/core/check.hpp>
#include <moca/data/loader.hpp>
#include <moca/io/atomic_file.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/train/progress.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "device.hpp"
#include "run_files.hpp"

namespace moca::cli {

namespace {

// The first n samples of another data set.
class FirstN : public data::Dataset {
 public:
  FirstN(const data::Dataset& base, std::int64_t n) : base_(base), n_(n) {}
  std::int64_t size() const override { return n_; }
  data::Sample get(std::int64_t i) const override { return base_.get(checked(i)); }
  std::int32_t label(std::int64_t i) const override { return base_.label(checked(i)); }
  int num_classes() const override { return base_.num_classes(); }

 private:
  std::int64_t checked(std::int64_t i) const {
    MOCA_CHECK(i >= 0 && i < n_, "data set prefix: index ", i, " out of range [0, ", n_, ")");
    return i;
  }
  const data::Dataset& base_;
  std::int64_t n_;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

std::string encoder_prefix(bool teacher) { return teacher ? "encoder_teacher." : "encoder."; }

LoadReport load_vit_weights(ParameterStore<float>& store, const SafetensorsFile& weights,
                            const std::string& prefix, const std::string& what) {
  const LoadReport report = load_parameters(store, weights, prefix, /*strict=*/false);
  LoadReport problems;
  for (const std::string& name : report.missing)
    if (name != prefix + "pos_embed") problems.missing.push_back(name);
  problems.mismatched = report.mismatched;
  MOCA_CHECK(problems.missing.empty() && problems.mismatched.empty(), weights.path(),
             ": the weights under prefix '", prefix, "' do not fit ", what, ": ", problems.str());
  return report;
}

namespace {

template <class T, class D>
eval::Features encode_on(VisionTransformer<T, D>& vit, const data::Dataset& ds,
                         const data::AugmentConfig& augment, eval::Pooling pooling,
                         std::int64_t batch, std::int64_t limit, int workers,
                         const std::string& progress_label, const std::function<void()>& poll) {
  MOCA_CHECK(limit >= 0, "a limit of ", limit, " images");
  const std::int64_t n = limit == 0 ? ds.size() : std::min(limit, ds.size());
  MOCA_CHECK(n > 0, "the data set holds no images");
  const FirstN part(ds, n);
  data::EvalLoader loader(part, augment, batch, workers);
  const auto& t = loader.transform();
  const VitConfig& vc = vit.config();
  MOCA_CHECK(t.channels() == vc.in_chans && t.size() == vc.img_size, "preprocessing makes ",
             t.channels(), "×", t.size(), "×", t.size(), " images but the encoder takes ",
             vc.in_chans, "×", vc.img_size, "×", vc.img_size);
  std::optional<train::ProgressBar> bar;
  if (!progress_label.empty()) bar.emplace(progress_label, n);
  eval::Features f = eval::encode(vit, loader, pooling, n, [&](std::int64_t done, std::int64_t) {
    if (poll) poll();
    if (bar) bar->update(done);
  });
  if (bar) bar->finish();
  return f;
}

}  // namespace

eval::Features encode_dataset(VisionTransformer<float>& vit, const data::Dataset& ds,
                              const data::AugmentConfig& augment, eval::Pooling pooling,
                              std::int64_t batch, std::int64_t limit, int workers,
                              const std::string& progress_label,
                              const std::function<void()>& poll) {
  return encode_on(vit, ds, augment, pooling, batch, limit, workers, progress_label, poll);
}

eval::Features pixel_features(const data::Dataset& ds, const data::AugmentConfig& augment,
                              std::int64_t batch, std::int64_t limit, int workers,
                              const std::string& progress_label) {
  MOCA_CHECK(limit >= 0, "a limit of ", limit, " images");
  const std::int64_t n = limit == 0 ? ds.size() : std::min(limit, ds.size());
  MOCA_CHECK(n > 0, "the data set holds no images");
  const FirstN part(ds, n);
  data::EvalLoader loader(part, augment, batch, workers);
  const std::int64_t dim = loader.transform().numel();
  eval::Features f;
  f.features.resize({n, dim});
  f.labels.assign(static_cast<std::size_t>(n), -1);
  std::optional<train::ProgressBar> bar;
  if (!progress_label.empty()) bar.emplace(progress_label, n);
  std::int64_t done = 0;
  while (const data::EvalBatch* b = loader.next()) {
    const std::int64_t m = b->size();
    copy(TensorView<float>(b->images).reshape({m, dim}),
         TensorView<float>(f.features).rows(done, done + m));
    for (std::int64_t k = 0; k < m; ++k)
      f.labels[static_cast<std::size_t>(done + k)] = b->labels[static_cast<std::size_t>(k)];
    done += m;
    if (bar) bar->update(done);
  }
  if (bar) bar->finish();
  return f;
}

template <class T, class D>
KnnResult run_knn_protocol(VisionTransformer<T, D>& vit, const RunData& data,
                           const data::AugmentConfig& augment, const KnnProtocol& p) {
  return run_knn_protocol(
      data, p, [&](const data::Dataset& ds, std::int64_t limit, const std::string& label) {
        return encode_on(vit, ds, augment, p.pooling, p.batch, limit, p.workers, label, p.poll);
      });
}

template KnnResult run_knn_protocol(VisionTransformer<float>&, const RunData&,
                                    const data::AugmentConfig&, const KnnProtocol&);
template KnnResult run_knn_protocol(VisionTransformer<bf16>&, const RunData&,
                                    const data::AugmentConfig&, const KnnProtocol&);
#if MOCA_WITH_CUDA
template KnnResult run_knn_protocol(VisionTransformer<float, Cuda>&, const RunData&,
                                    const data::AugmentConfig&, const KnnProtocol&);
template KnnResult run_knn_protocol(VisionTransformer<bf16, Cuda>&, const RunData&,
                                    const data::AugmentConfig&, const KnnProtocol&);
#endif

KnnResult run_knn_protocol(
    const RunData& data, const KnnProtocol& p,
    const std::function<eval::Features(const data::Dataset&, std::int64_t, const std::string&)>&
        features) {
  MOCA_CHECK(data.train != nullptr, "k-NN: no data");
  MOCA_CHECK(data.test != nullptr, "k-NN needs a test split for its queries, and ",
             data.description, " has none (use fashion-mnist, a folder of IDX files with the "
             "t10k files, or an image folder with train/ and val/ or test/)");
  MOCA_CHECK(data.train->num_classes() > 0 && data.test->num_classes() > 0,
             "k-NN needs labelled images, and ", data.description, " is unlabelled");
  MOCA_CHECK(!p.ks.empty(), "k-NN: no k given");
  for (std::int64_t k : p.ks) MOCA_CHECK(k >= 1, "k-NN: k must be at least 1, got ", k);
  MOCA_CHECK(p.temperature > 0, "k-NN: the temperature must be positive, got ", p.temperature);
  MOCA_CHECK(p.batch > 0, "k-NN: the batch size must be positive, got ", p.batch);
  MOCA_CHECK(p.bank_limit >= 0 && p.query_limit >= 0, "k-NN: negative image limit");

  KnnResult r;
  r.pooling = p.pooling;
  r.temperature = p.temperature;
  r.classes = std::max(data.train->num_classes(), data.test->num_classes());
  const auto t0 = std::chrono::steady_clock::now();
  const eval::Features bank = features(*data.train, p.bank_limit, p.progress ? "k-NN bank" : "");
  const eval::Features queries =
      features(*data.test, p.query_limit, p.progress ? "k-NN queries" : "");
  r.encode_seconds = seconds_since(t0);
  r.bank = bank.features.size(0);
  r.queries = queries.features.size(0);
  for (const auto* f : {&bank, &queries})
    for (std::int32_t l : f->labels)
      MOCA_CHECK(l >= 0, "k-NN: an image of ", data.description, " has no label");

  const auto t1 = std::chrono::steady_clock::now();
  r.accuracy = eval::knn_evaluate(TensorView<float>(bank.features),
                                  std::span<const std::int32_t>(bank.labels),
                                  TensorView<float>(queries.features),
                                  std::span<const std::int32_t>(queries.labels),
                                  std::span<const std::int64_t>(p.ks), p.temperature, r.classes);
  r.search_seconds = seconds_since(t1);
  return r;
}

nlohmann::json KnnResult::to_json() const {
  nlohmann::json results = nlohmann::json::array();
  for (const eval::KnnAccuracy& a : accuracy)
    results.push_back({{"k", a.k},
                       {"temperature", a.temperature},
                       {"top1", a.top1},
                       {"top5", a.top5},
                       {"correct1", a.correct1},
                       {"correct5", a.correct5},
                       {"count", a.count}});
  return {{"pooling", eval::to_string(pooling)},
          {"temperature", temperature},
          {"bank", bank},
          {"queries", queries},
          {"classes", classes},
          {"results", results},
          {"encode_seconds", encode_seconds},
          {"search_seconds", search_seconds}};
}

void print_knn_table(const KnnResult& r, std::FILE* out) {
  std::fprintf(out, "k-NN (%s pooling, %lld bank images, %lld queries, %d classes)\n",
               eval::to_string(r.pooling), static_cast<long long>(r.bank),
               static_cast<long long>(r.queries), r.classes);
  std::fprintf(out, "%6s %8s %9s %9s\n", "k", "T", "top-1 %", "top-5 %");
  for (const eval::KnnAccuracy& a : r.accuracy)
    std::fprintf(out, "%6lld %8.4g %9.2f %9.2f\n", static_cast<long long>(a.k), a.temperature,
                 100.0 * a.top1, 100.0 * a.top5);
  std::fflush(out);
}

namespace {
CLI::Validator number_check(bool allow_zero) {
  return CLI::Validator(
      [allow_zero](std::string& s) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || end == nullptr || *end != '\0') return "'" + s + "' is not a number";
        if (allow_zero ? v >= 0 : v > 0) return {};
        return (allow_zero ? "must not be negative, got " : "must be positive, got ") + s;
      },
      allow_zero ? "NONNEGATIVE" : "POSITIVE");
}
}  // namespace

CLI::Validator positive_value() { return number_check(false); }
CLI::Validator non_negative_value() { return number_check(true); }

void set_cpu_threads(int threads) {
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

CLI::App* add_knn_command(CLI::App& app, KnnOptions& opt) {
  CLI::App* cmd = app.add_subcommand(
      "knn", "Weighted k-NN accuracy of a MOCA checkpoint's encoder (train split as the memory "
             "bank, test split as the queries)");
  auto* ckpt = cmd->add_option("--checkpoint", opt.checkpoint,
                               "weights file, checkpoint folder, checkpoints folder or run folder");
  auto* pixels = cmd->add_flag("--pixels", opt.pixels,
                               "raw-pixel baseline: the preprocessed images are the features");
  ckpt->excludes(pixels);
  cmd->add_option("--preset", opt.preset,
                  "with --pixels: the image geometry of this preset (tiny, vit-s16, vit-b16)")
      ->capture_default_str()
      ->check(CLI::IsMember({"tiny", "vit-s16", "vit-b16"}))
      ->needs(pixels);
  cmd->add_option("--data", opt.data,
                  "fashion-mnist, a folder of IDX files, or an image folder with train/ and "
                  "val/ (or test/)")
      ->capture_default_str();
  auto* teacher = cmd->add_flag("--teacher", opt.teacher, "evaluate the EMA teacher (default)");
  auto* student = cmd->add_flag("--student", opt.student, "evaluate the student encoder");
  teacher->excludes(student);
  cmd->add_option("--pool", opt.pool, "image feature: avg (patch tokens) or cls")
      ->capture_default_str()
      ->check(CLI::IsMember({"avg", "cls"}));
  cmd->add_option("-k", opt.ks, "neighbours, comma-separated (e.g. 10,20)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(positive_value());
  cmd->add_option("--temperature", opt.temperature, "temperature T of the vote weights exp(s/T)")
      ->capture_default_str()
      ->check(positive_value());
  cmd->add_option("--batch", opt.batch, "images per forward pass")
      ->capture_default_str()
      ->check(positive_value());
  cmd->add_option("--device", opt.device, "where the encoder runs: cpu or cuda (the first GPU)")
      ->capture_default_str();
  cmd->add_option("--threads", opt.threads, "CPU threads (0: all)")
      ->capture_default_str()
      ->check(non_negative_value());
  cmd->add_option("--workers", opt.workers, "preprocessing threads")
      ->capture_default_str()
      ->check(non_negative_value());
  cmd->add_option("--bank-limit", opt.bank_limit, "use the first N train images (0: all)")
      ->capture_default_str()
      ->check(non_negative_value());
  cmd->add_option("--query-limit", opt.query_limit, "use the first N test images (0: all)")
      ->capture_default_str()
      ->check(non_negative_value());
  cmd->add_flag("--strict", opt.strict,
                "an unreadable image is an error (default: skipped with a warning)");
  cmd->add_option("--json", opt.json, "also write the result to this JSON file");
  return cmd;
}

void run_knn(const KnnOptions& opt) {
  set_cpu_threads(opt.threads);
  MOCA_CHECK(opt.pixels || !opt.checkpoint.empty(),
             "moca knn: give --checkpoint (a run, checkpoint or weights file) or --pixels");
  MOCA_CHECK(!opt.pixels || opt.device == "cpu", "--pixels reads no encoder: --device ", opt.device,
             " does not apply");
  require_device(opt.device);
  KnnProtocol p;
  p.pooling = eval::parse_pooling(opt.pool);
  p.ks = opt.ks;
  p.temperature = opt.temperature;
  p.batch = opt.batch;
  p.bank_limit = opt.bank_limit;
  p.query_limit = opt.query_limit;
  p.workers = opt.workers;
  auto write_json = [&](nlohmann::json j) {
    if (opt.json.empty()) return;
    const std::string text =
        j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    AtomicFileWriter out(opt.json);
    out.write(text.data(), text.size());
    out.commit();
  };
  if (opt.pixels) {
    const VitConfig geometry = opt.preset == "tiny"      ? VitConfig::tiny()
                               : opt.preset == "vit-s16" ? VitConfig::vit_s16()
                                                         : VitConfig::vit_b16();
    const RunData data = open_run_data(opt.data, opt.strict);
    const data::AugmentConfig aug = augment_for(geometry, data.fashion_mnist_like);
    std::fprintf(stderr, "raw pixels (%d×%d×%d, normalised)\ndata: %s\n", aug.channels,
                 aug.eval_crop, aug.eval_crop, data.description.c_str());
    const KnnResult r = run_knn_protocol(
        data, p, [&](const data::Dataset& ds, std::int64_t limit, const std::string& label) {
          return pixel_features(ds, aug, p.batch, limit, p.workers, label);
        });
    print_knn_table(r, stdout);
    nlohmann::json j = r.to_json();
    j["pooling"] = "pixels";
    j["data"] = data.description;
    write_json(j);
    return;
  }
  const std::filesystem::path weights_path = resolve_weights(opt.checkpoint);
  const auto weights = SafetensorsFile::open(weights_path);
  const MocaConfig cfg = read_moca_config(weights);
  const bool teacher = !opt.student;

  VisionTransformer<float> vit(cfg.encoder);
  ParameterStore<float> params(vit, /*with_grads=*/false);
  params.initialize(0);  // the fixed position table, should the file lack it
  const VitConfig& e = cfg.encoder;
  load_vit_weights(params, weights, encoder_prefix(teacher),
                   detail::str("the encoder its '", kConfigKey, "' metadata describes (", e.dim,
                               " wide, ", e.depth, " deep, patch ", e.patch, ", ", e.img_size,
                               "×", e.img_size, "×", e.in_chans, ")"));

  const RunData data = open_run_data(opt.data, opt.strict);
  std::fprintf(stderr, "weights: %s (%s encoder)\ndata: %s\n", weights_path.string().c_str(),
               teacher ? "teacher" : "student", data.description.c_str());

  const data::AugmentConfig aug = augment_for(cfg.encoder, data.fashion_mnist_like);
  KnnResult r;
  if (opt.device == "cpu") {
    r = run_knn_protocol(vit, data, aug, p);
  } else {
#if MOCA_WITH_CUDA
    // The same encoder on the GPU: its parameter arenas have the host store's layout.
    VisionTransformer<float, Cuda> gpu_vit(cfg.encoder);
    ParameterStore<float, Cuda> gpu_params(gpu_vit, /*with_grads=*/false);
    copy(params.values(), gpu_params.values());
    copy(params.frozen(), gpu_params.frozen());
    r = run_knn_protocol(gpu_vit, data, aug, p);
#endif
  }
  print_knn_table(r, stdout);

  nlohmann::json j = r.to_json();
  j["weights"] = weights_path.string();
  j["encoder"] = teacher ? "teacher" : "student";
  j["device"] = opt.device;
  j["data"] = data.description;
  write_json(j);
}

}  // namespace moca::cli
