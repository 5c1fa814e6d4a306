// `moca pretrain`: the training loop around Moca<T, D>::train_step, on the CPU or (--device
// cuda) the GPU, in float or (--precision bf16) in bf16 storage with float master weights; the
// loader, logs, checkpoints and the k-NN vote stay on the host. Checkpoints hold float weights
// and moments whatever the precision, so a run may resume in the other one.
//
// A run lives in its output folder (run_files.hpp): the resolved configuration, a JSONL log, an
// SVG of the curves and numbered checkpoints. Everything random in a step is a pure function of
// (seed, step) — masks, codebook refresh, data order and augmentation — so a run stopped after
// step s (Ctrl-C, --until-step, the time limit, a crash after a checkpoint) and resumed with
// --resume continues exactly as if it had never stopped.
//
// Length: --epochs N plans N epochs; --minutes M times a few steps of a throwaway model first and
// plans as many steps as fit in M minutes, then also stops at the M-minute mark should the
// machine slow down. Every schedule (lr warmup + cosine, weight decay, teacher momentum) is laid
// over the planned length, as spec §16 prescribes for the small presets.
#include "pretrain.hpp"

#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <type_traits>
#include <moca/core/memory.hpp>
#include <moca/data/loader.hpp>
#include <moca/eval/features.hpp>
#include <moca/models/moca/checkpoint.hpp>
#include <moca/models/moca/config_json.hpp>
#include <moca/models/moca/moca.hpp>
#include <moca/models/moca/train_state.hpp>
#include <moca/optim/schedules.hpp>
#include <moca/train/checkpoint_dir.hpp>
#include <moca/train/jsonl_log.hpp>
#include <moca/train/progress.hpp>
#include <moca/train/svg_plot.hpp>
#if MOCA_WITH_CUDA
#include <moca/cuda.hpp>
#endif

#include "data_source.hpp"
#include "device.hpp"
#include "knn.hpp"
#include "run_files.hpp"

namespace moca::cli {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Flags whose value shapes the training run; a resumed run must not change them.
const char* const kTrainingFlags[] = {
    "--data",        "--preset",         "--epochs",          "--minutes",     "--batch",
    "--accum",       "--seed",           "--embed-dim",       "--depth",       "--heads",
    "--dec-dim",     "--dec-depth",      "--dec-heads",       "--early-layer", "--num-words",
    "--skip-offset", "--words-per-iter", "--inv-delta",       "--dist-norm-decay",
    "--kappa",       "--pred-mlp-ratio", "--img-weight",      "--loc-weight",  "--clip-grad",
    "--mask-ratio",  "--dec-mask-ratio", "--pooling",         "--blr",         "--lr",
    "--warmup",      "--lr-epochs-mul",  "--wd",              "--wd-end",      "--momentum",
    "--momentum-end", "--wgen-lr",       "--wgen-wd"};

std::atomic<int> g_interrupts{0};

// Thrown out of an evaluation when Ctrl-C arrives, so that a long k-NN pass does not delay it.
struct Interrupted {};

extern "C" void on_interrupt(int) {
  // The first Ctrl-C asks the loop to save and stop; a second one ends the process at once.
  if (g_interrupts.fetch_add(1) >= 1) {
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
  }
}

MocaConfig preset_config(const std::string& preset) {
  if (preset == "tiny") return MocaConfig::tiny();
  if (preset == "vit-s16") return MocaConfig::vit_s16();
  if (preset == "vit-b16") return MocaConfig::vit_b16();
  MOCA_CHECK(false, "--preset must be tiny, vit-s16 or vit-b16, got '", preset, "'");
  return {};
}

MocaConfig resolve_model(const PretrainOptions& o) {
  MocaConfig c = preset_config(o.preset);
  if (o.embed_dim) c.encoder.dim = *o.embed_dim;
  if (o.depth) c.encoder.depth = *o.depth;
  if (o.heads) c.encoder.heads = *o.heads;
  if (o.dec_dim) c.decoder.dim = *o.dec_dim;
  if (o.dec_depth) c.decoder.depth = *o.dec_depth;
  if (o.dec_heads) c.decoder.heads = *o.dec_heads;
  if (o.early_layer) c.early_layer = *o.early_layer;
  if (o.num_words) c.num_words = *o.num_words;
  if (o.skip_offset) c.skip_offset = *o.skip_offset;
  if (o.words_per_iter) c.words_per_iter = *o.words_per_iter;
  if (o.inv_delta) c.inv_delta = *o.inv_delta;
  if (o.dist_norm_decay) c.dist_norm_decay = *o.dist_norm_decay;
  if (o.kappa) c.kappa = *o.kappa;
  if (o.pred_mlp_ratio) c.pred_mlp_ratio = *o.pred_mlp_ratio;
  if (o.img_weight) c.img_weight = *o.img_weight;
  if (o.loc_weight) c.loc_weight = *o.loc_weight;
  if (o.clip_grad) c.clip_grad = *o.clip_grad;
  if (!o.mask_ratio.empty()) {
    MOCA_CHECK(o.mask_ratio.size() == 2, "--mask-ratio takes two values (round 1, round 2)");
    c.mask_ratio[0] = o.mask_ratio[0];
    c.mask_ratio[1] = o.mask_ratio[1];
  }
  if (!o.dec_mask_ratio.empty()) {
    MOCA_CHECK(o.dec_mask_ratio.size() == 2, "--dec-mask-ratio takes two values");
    c.dec_mask_ratio[0] = o.dec_mask_ratio[0];
    c.dec_mask_ratio[1] = o.dec_mask_ratio[1];
  }
  if (o.pooling) {
    MOCA_CHECK(*o.pooling == "avg" || *o.pooling == "cls", "--pooling must be avg or cls");
    c.avg_pooling = *o.pooling == "avg";
  }
  c.validate();
  return c;
}

// Everything that defines the run, as saved in config.json and in every checkpoint. "steps" and
// "steps_per_epoch" are filled in once the length is planned.
json resolve_run(const PretrainOptions& o, const MocaConfig& cfg) {
  const double blr = o.blr.value_or(o.preset == "tiny" ? 1e-3 : 1.5e-4);
  const double peak = o.lr.value_or(blr * static_cast<double>(o.batch) / 256.0);
  MOCA_CHECK(o.batch > 0 && o.accum > 0 && o.batch % o.accum == 0, "--batch ", o.batch,
             " must be a positive multiple of --accum ", o.accum);
  MOCA_CHECK(o.epochs.has_value() != o.minutes.has_value() || (!o.epochs && !o.minutes),
             "give --epochs or --minutes, not both");
  MOCA_CHECK(!o.epochs || *o.epochs > 0, "--epochs must be positive");
  MOCA_CHECK(!o.minutes || *o.minutes > 0, "--minutes must be positive");
  MOCA_CHECK(o.warmup >= 0 && o.warmup < 1, "--warmup is a fraction of the run in [0, 1)");
  MOCA_CHECK(o.lr_epochs_mul >= 1, "--lr-epochs-mul must be at least 1");
  MOCA_CHECK(peak >= 0 && o.wd >= 0 && o.wd_end >= 0 && o.wgen_lr >= 0 && o.wgen_wd >= 0,
             "learning rates and weight decays must be non-negative");
  MOCA_CHECK(o.momentum >= 0 && o.momentum <= 1 && o.momentum_end >= 0 && o.momentum_end <= 1,
             "--momentum and --momentum-end lie in [0, 1]");
  json length;
  if (o.minutes) {
    length = {{"minutes", *o.minutes}};
  } else {
    length = {{"epochs", o.epochs.value_or(10.0)}};
  }
  return {{"data", o.data},
          {"preset", o.preset},
          {"model", config_to_json(cfg)},
          {"length", length},
          {"batch", o.batch},
          {"accum", o.accum},
          {"seed", o.seed},
          {"schedule",
           {{"peak_lr", peak},
            {"warmup_fraction", o.warmup},
            {"lr_epochs_mul", o.lr_epochs_mul},
            {"wd", o.wd},
            {"wd_end", o.wd_end},
            {"momentum", o.momentum},
            {"momentum_end", o.momentum_end},
            {"wgen_lr", o.wgen_lr},
            {"wgen_wd", o.wgen_wd}}}};
}

// The schedules over a planned run of `steps` steps.
MocaSchedule make_schedule(const json& run) {
  const json& s = run.at("schedule");
  MocaSchedule sc;
  sc.iters_per_epoch = run.at("steps_per_epoch").get<std::int64_t>();
  const auto steps = run.at("steps").get<std::int64_t>();
  sc.max_epochs = static_cast<double>(steps) / static_cast<double>(sc.iters_per_epoch);
  sc.warmup_epochs = s.at("warmup_fraction").get<double>() * sc.max_epochs;
  sc.lr_epochs_mul = s.at("lr_epochs_mul").get<double>();
  // The reference truncates the lr horizon to whole epochs; a run planned in minutes or
  // fractional epochs keeps it exact.
  sc.truncate_lr_horizon = run.at("length").contains("epochs") &&
                           std::floor(run.at("length").at("epochs").get<double>()) ==
                               run.at("length").at("epochs").get<double>();
  sc.peak_lr = s.at("peak_lr").get<double>();
  sc.wd_start = s.at("wd").get<double>();
  sc.wd_end = s.at("wd_end").get<double>();
  sc.momentum_start = s.at("momentum").get<double>();
  sc.momentum_end = s.at("momentum_end").get<double>();
  sc.wgen_lr = s.at("wgen_lr").get<double>();
  sc.wgen_weight_decay = s.at("wgen_wd").get<double>();
  return sc;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

void write_text_atomic(const fs::path& p, const std::string& text) {
  AtomicFileWriter out(p);
  out.write(text.data(), text.size());
  out.commit();
}

// Two views of one step, copied out of the loader when a step spans several micro-batches,
// trains on another device than the CPU or in another type than float (`stage`: the host side
// of that conversion).
template <class T, class D>
struct StepBatches {
  std::vector<Tensor<T, D>> x1, x2;
  std::vector<MocaPlan> plans;
  Tensor<T> stage;
};

// The curves drawn in curves.svg, rebuilt from the log when a run resumes.
struct Curves {
  std::vector<double> step, loss, img, loc, knn_step, knn_top1;

  void add(const json& r) {
    if (r.contains("knn_top1")) {
      knn_step.push_back(r.at("step").get<double>());
      knn_top1.push_back(100.0 * r.at("knn_top1").get<double>());
    } else if (r.contains("loss")) {
      step.push_back(r.at("step").get<double>());
      loss.push_back(r.at("loss").get<double>());
      img.push_back(r.at("l_img").get<double>());
      loc.push_back(r.at("l_loc").get<double>());
    }
  }
  void write(const fs::path& path) const {
    train::write_svg_plot(
        path, {{"MOCA loss", "step", "", {{"loss", step, loss}, {"L_IMG", step, img},
                                          {"L_LOC", step, loc}}},
               {"k-NN top-1 (%)", "step", "", {{"teacher", knn_step, knn_top1}}}});
  }
};

}  // namespace

// The evaluation settings of a run, saved with it: a resumed run evaluates as it started unless
// the resuming command gives the flag again.
json evaluation_to_json(const PretrainOptions& o) {
  return {{"knn_every", o.knn_every},     {"knn_init", o.knn_init},
          {"final_knn", o.final_knn},     {"knn_k", o.knn_k},
          {"knn_temperature", o.knn_temperature}, {"knn_pool", o.knn_pool},
          {"knn_student", o.knn_student}, {"knn_bank", o.knn_bank},
          {"knn_queries", o.knn_queries}, {"knn_batch", o.knn_batch}};
}

void restore_evaluation(PretrainOptions& o, const CLI::App& cmd, const json& saved) {
  auto take = [&](const char* flag, const char* key, auto& field) {
    if (cmd.count(flag) == 0 && saved.contains(key))
      field = saved.at(key).get<std::decay_t<decltype(field)>>();
  };
  take("--knn-every", "knn_every", o.knn_every);
  take("--knn-init", "knn_init", o.knn_init);
  take("--final-knn", "final_knn", o.final_knn);
  take("--knn-k", "knn_k", o.knn_k);
  take("--knn-temperature", "knn_temperature", o.knn_temperature);
  take("--knn-pool", "knn_pool", o.knn_pool);
  take("--knn-student", "knn_student", o.knn_student);
  take("--knn-bank", "knn_bank", o.knn_bank);
  take("--knn-queries", "knn_queries", o.knn_queries);
  take("--knn-batch", "knn_batch", o.knn_batch);
}

CLI::App* add_pretrain_command(CLI::App& app, PretrainOptions& o) {
  CLI::App* cmd = app.add_subcommand("pretrain", "MOCA self-supervised pretraining");
  cmd->footer(
      "A run lives in --out: config.json, log.jsonl, curves.svg and checkpoints/. Ctrl-C saves a "
      "checkpoint and stops; --resume continues the run exactly.");
  auto* g = "Run";
  cmd->add_option("--data", o.data,
                  "fashion-mnist, a folder of IDX files, or an image folder (class sub-folders; "
                  "DIR/train + DIR/val for k-NN)")
      ->capture_default_str()->group(g);
  cmd->add_option("--preset", o.preset, "tiny (Fashion-MNIST, spec §16), vit-s16 or vit-b16")
      ->capture_default_str()->group(g);
  auto* ep = cmd->add_option("--epochs", o.epochs, "planned length in epochs (default 10)")->group(g);
  cmd->add_option("--minutes", o.minutes, "planned length in minutes of training")
      ->excludes(ep)->group(g);
  cmd->add_option("--batch", o.batch, "image pairs per step")->capture_default_str()->group(g);
  cmd->add_option("--accum", o.accum, "micro-batches per step (gradient accumulation)")
      ->capture_default_str()->group(g);
  cmd->add_option("--seed", o.seed, "seeds initialisation, masks, data order, augmentation")
      ->capture_default_str()->group(g);
  cmd->add_flag("--strict", o.strict, "an unreadable image is an error instead of a skip")->group(g);
  cmd->add_option("--out", o.out, "output folder")->capture_default_str()->group(g);
  cmd->add_flag("--resume", o.resume, "continue the run in --out from its latest checkpoint")
      ->group(g);
  cmd->add_option("--device", o.device, "where the model trains: cpu or cuda (the first GPU)")
      ->capture_default_str()->group(g);
  cmd->add_option("--matmul", o.matmul,
                  "cuda: matrix products in fp32, tf32 (tensor cores) or bf16 (Linears with bf16 "
                  "inputs, fp32 accumulation)")
      ->capture_default_str()->group(g);
  cmd->add_option("--precision", o.precision,
                  "fp32, or bf16: values and activations in bf16 with fp32 gradients, master "
                  "weights, moments and accumulation (checkpoints hold fp32 either way)")
      ->capture_default_str()
      ->group(g);
  cmd->add_option("--threads", o.threads, "compute threads (0: all cores)")
      ->capture_default_str()->group(g);
  cmd->add_option("--workers", o.workers, "data loading threads")->capture_default_str()->group(g);
  cmd->add_option("--keep", o.keep, "checkpoints kept on disk")->capture_default_str()->group(g);
  cmd->add_option("--ckpt-minutes", o.ckpt_minutes,
                  "minutes between checkpoints (also at each epoch end and at the end)")
      ->capture_default_str()->group(g);
  cmd->add_option("--log-every", o.log_every, "steps between log records")
      ->capture_default_str()->group(g);
  cmd->add_option("--until-step", o.until_step,
                  "stop with a checkpoint after this step (resume later with --resume)")
      ->group(g);

  g = "Evaluation";
  cmd->add_option("--knn-every", o.knn_every, "epochs between k-NN evaluations (0: none)")
      ->capture_default_str()->group(g);
  cmd->add_flag("--knn-init", o.knn_init, "evaluate k-NN before the first step as well")->group(g);
  cmd->add_flag("--final-knn,!--no-final-knn", o.final_knn, "evaluate k-NN at the end")->group(g);
  cmd->add_option("--knn-k", o.knn_k, "neighbour counts")->delimiter(',')
      ->capture_default_str()->group(g);
  cmd->add_option("--knn-temperature", o.knn_temperature, "vote temperature")
      ->capture_default_str()->group(g);
  cmd->add_option("--knn-pool", o.knn_pool, "avg (patch tokens) or cls")
      ->capture_default_str()->group(g);
  cmd->add_flag("--knn-student", o.knn_student, "evaluate the student instead of the teacher")
      ->group(g);
  cmd->add_option("--knn-bank", o.knn_bank, "memory bank: first N training images (0: all)")
      ->capture_default_str()->group(g);
  cmd->add_option("--knn-queries", o.knn_queries, "queries: first N test images (0: all)")
      ->capture_default_str()->group(g);
  cmd->add_option("--knn-batch", o.knn_batch, "images per forward pass in evaluation")
      ->capture_default_str()->group(g);

  g = "Model (default: the preset's)";
  cmd->add_option("--embed-dim", o.embed_dim, "encoder width")->group(g);
  cmd->add_option("--depth", o.depth, "encoder blocks")->group(g);
  cmd->add_option("--heads", o.heads, "encoder attention heads")->group(g);
  cmd->add_option("--dec-dim", o.dec_dim, "decoder width")->group(g);
  cmd->add_option("--dec-depth", o.dec_depth, "decoder blocks")->group(g);
  cmd->add_option("--dec-heads", o.dec_heads, "decoder heads")->group(g);
  cmd->add_option("--early-layer", o.early_layer, "decoder input: block depth-1-N")->group(g);
  cmd->add_option("--num-words", o.num_words, "codebook size K")->group(g);
  cmd->add_option("--skip-offset", o.skip_offset, "border tokens left out of the BoW")->group(g);
  cmd->add_option("--words-per-iter", o.words_per_iter, "codebook words replaced per step")
      ->group(g);
  cmd->add_option("--inv-delta", o.inv_delta, "assignment inverse temperature numerator")->group(g);
  cmd->add_option("--dist-norm-decay", o.dist_norm_decay, "EMA decay of dist_norm")->group(g);
  cmd->add_option("--kappa", o.kappa, "prediction inverse temperature")->group(g);
  cmd->add_option("--pred-mlp-ratio", o.pred_mlp_ratio, "generator hidden width / width")->group(g);
  cmd->add_option("--img-weight", o.img_weight, "weight of L_IMG")->group(g);
  cmd->add_option("--loc-weight", o.loc_weight, "weight of L_LOC")->group(g);
  cmd->add_option("--clip-grad", o.clip_grad, "global gradient norm limit (negative: off)")
      ->group(g);
  cmd->add_option("--mask-ratio", o.mask_ratio, "encoder mask ratios of the two rounds")
      ->delimiter(',')->expected(2)->group(g);
  cmd->add_option("--dec-mask-ratio", o.dec_mask_ratio, "decoder mask ratios of the two rounds")
      ->delimiter(',')->expected(2)->group(g);
  cmd->add_option("--pooling", o.pooling, "global embedding: avg or cls")->group(g);

  g = "Optimisation";
  cmd->add_option("--blr", o.blr, "base lr; peak lr = blr * batch / 256 (tiny 1e-3, else 1.5e-4)")
      ->group(g);
  cmd->add_option("--lr", o.lr, "absolute peak lr (overrides --blr)")->group(g);
  cmd->add_option("--warmup", o.warmup, "lr warmup as a fraction of the run")
      ->capture_default_str()->group(g);
  cmd->add_option("--lr-epochs-mul", o.lr_epochs_mul, "lr cosine horizon / run length")
      ->capture_default_str()->group(g);
  cmd->add_option("--wd", o.wd, "weight decay at the start")->capture_default_str()->group(g);
  cmd->add_option("--wd-end", o.wd_end, "weight decay at the end (cosine)")
      ->capture_default_str()->group(g);
  cmd->add_option("--momentum", o.momentum, "teacher EMA momentum at the start")
      ->capture_default_str()->group(g);
  cmd->add_option("--momentum-end", o.momentum_end, "teacher EMA momentum at the end (cosine)")
      ->capture_default_str()->group(g);
  cmd->add_option("--wgen-lr", o.wgen_lr, "constant lr of the prototype generators")
      ->capture_default_str()->group(g);
  cmd->add_option("--wgen-wd", o.wgen_wd, "constant weight decay of the generators")
      ->capture_default_str()->group(g);
  return cmd;
}

namespace {

template <class T, class D>
int pretrain_on(const PretrainOptions& given, const CLI::App& cmd) {
  PretrainOptions o = given;  // a resumed run restores its evaluation settings
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  MOCA_CHECK(o.threads >= 0 && o.workers >= 0 && o.log_every > 0 && o.knn_every >= 0 &&
                 o.ckpt_minutes > 0 && o.until_step >= 0 && o.knn_batch > 0 && o.keep >= 1,
             "--threads, --workers, --knn-every, --until-step must be non-negative; --log-every, "
             "--ckpt-minutes, --knn-batch, --keep positive");
  MOCA_CHECK(!o.knn_k.empty() && o.knn_temperature > 0, "--knn-k needs at least one k and "
             "--knn-temperature must be positive");
  for (std::int64_t k : o.knn_k) MOCA_CHECK(k >= 1, "--knn-k: k must be at least 1, got ", k);
  (void)eval::parse_pooling(o.knn_pool);  // checked before any work starts
  if (o.threads > 0) omp_set_num_threads(o.threads);

  const fs::path out(o.out);
  const fs::path ckpt_root = out / "checkpoints";
  train::CheckpointDir ckpts(ckpt_root, o.keep);

  // The run: from the flags, or from the checkpoint when resuming.
  json run;
  std::optional<fs::path> resume_dir;
  if (o.resume) {
    resume_dir = ckpts.latest();
    MOCA_CHECK(resume_dir.has_value(), "--resume: no checkpoint in ", ckpt_root.string(),
               " (start the run without --resume)");
    const auto state = SafetensorsFile::open(*resume_dir / kStateFile);
    const auto text = state.metadata(kRunKey);
    MOCA_CHECK(text.has_value(), state.path(), ": no '", kRunKey, "' metadata");
    run = json::parse(*text, nullptr, false);
    MOCA_CHECK(!run.is_discarded() && run.is_object(), state.path(), ": the '", kRunKey,
               "' metadata is not a JSON object");
    bool given = false;
    for (const char* flag : kTrainingFlags) given = given || cmd.count(flag) > 0;
    if (given) {
      // The flags repeat the original command: they must describe the same run.
      json saved = run;
      saved.erase("steps");
      saved.erase("steps_per_epoch");
      saved.erase("evaluation");
      const json now = resolve_run(o, resolve_model(o));
      const auto diff = config_differences(saved, now);
      if (!diff.empty()) {
        std::string list;
        for (const auto& d : diff) list += "\n  " + d;
        MOCA_CHECK(false, "--resume: the flags describe another run than the one in ",
                   out.string(), " (leave training flags out to continue it):", list);
      }
    }
  } else {
    std::error_code ec;
    MOCA_CHECK(!fs::exists(ckpt_root / "latest", ec), out.string(),
               " already holds a run: continue it with --resume or choose another --out");
    run = resolve_run(o, resolve_model(o));
  }
  if (run.contains("evaluation")) restore_evaluation(o, cmd, run.at("evaluation"));
  run["evaluation"] = evaluation_to_json(o);
  const eval::Pooling knn_pool = eval::parse_pooling(o.knn_pool);
  const MocaConfig cfg = moca_config_from_json(run.at("model"), (out / "config.json").string());
  const std::int64_t batch = run.at("batch").get<std::int64_t>();
  const std::int64_t accum = run.at("accum").get<std::int64_t>();
  const std::int64_t micro = batch / accum;
  const auto seed = run.at("seed").get<std::uint64_t>();

  // Data.
  RunData data = open_run_data(run.at("data").get<std::string>(), o.strict);
  const data::AugmentConfig aug = augment_for(cfg.encoder, data.fashion_mnist_like);
  data::LoaderOptions lopt;
  lopt.batch_size = micro;
  lopt.workers = o.workers;
  lopt.seed = seed;
  data::TwoViewLoader loader(*data.train, aug, lopt);
  const std::int64_t steps_per_epoch = std::max<std::int64_t>(1, loader.batches_per_epoch() / accum);
  const bool can_knn = data.test != nullptr && data.train->num_classes() > 0;

  const bool float_products_mode = o.device == "cuda" && std::is_same_v<T, float>;
  std::fprintf(stderr, "moca pretrain\n  device    %s, %s%s%s\n  data      %s\n",
               o.device.c_str(),
               std::is_same_v<T, float> ? "fp32" : "bf16 values with fp32 master weights",
               float_products_mode ? ", matrix products in " : "",
               float_products_mode ? o.matmul.c_str() : "", data.description.c_str());
  if (std::is_same_v<D, Cpu> && !std::is_same_v<T, float>) {
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
    std::fprintf(stderr,
                 "  note      bf16 on the CPU about halves the memory of a step; its "
                 "matrix products run on the CPU's AVX-512 BF16 dot products\n");
#else
    std::fprintf(stderr,
                 "  note      bf16 on the CPU about halves the memory of a step at "
                 "about fp32's speed (this build's kernels compute bf16 in float)\n");
#endif
  }
  std::fprintf(stderr,
               "  encoder   %lldx%lld patch %lld, %lld channels, width %lld, depth %lld, %lld heads\n"
               "  decoder   width %lld, depth %lld, %lld heads; early_layer %lld\n"
               "  codebook  K %lld, %lld new words per step, inv_delta %g, kappa %g\n"
               "  batch     %lld pairs (%lld micro-batches), %lld steps per epoch, seed %llu\n",
               static_cast<long long>(cfg.encoder.img_size),
               static_cast<long long>(cfg.encoder.img_size),
               static_cast<long long>(cfg.encoder.patch),
               static_cast<long long>(cfg.encoder.in_chans),
               static_cast<long long>(cfg.encoder.dim), static_cast<long long>(cfg.encoder.depth),
               static_cast<long long>(cfg.encoder.heads), static_cast<long long>(cfg.decoder.dim),
               static_cast<long long>(cfg.decoder.depth),
               static_cast<long long>(cfg.decoder.heads),
               static_cast<long long>(cfg.early_layer), static_cast<long long>(cfg.num_words),
               static_cast<long long>(cfg.words_per_iter), cfg.inv_delta, cfg.kappa,
               static_cast<long long>(batch), static_cast<long long>(accum),
               static_cast<long long>(steps_per_epoch), static_cast<unsigned long long>(seed));

  const Philox rng(seed);
  using Model = Moca<T, D>;
  // The loader's batch is used in place when one micro-batch makes a float step on the CPU.
  constexpr bool kLoaderViews = std::is_same_v<D, Cpu> && std::is_same_v<T, float>;
  const bool copy_views = accum > 1 || !kLoaderViews;
  StepBatches<T, D> sb;
  sb.plans.resize(static_cast<std::size_t>(accum));
  if (copy_views) {
    sb.x1.resize(static_cast<std::size_t>(accum));
    sb.x2.resize(static_cast<std::size_t>(accum));
  }
  // Fetches the micro-batches of step s (the loader must stand at item s · accum) and draws
  // their plans. Returns the views of micro-batch i through x1/x2.
  std::vector<typename Model::MicroBatch> micro_batches(static_cast<std::size_t>(accum));
  auto load_step = [&](std::int64_t s, Model& m) {
    for (std::int64_t i = 0; i < accum; ++i) {
      const data::TwoViewBatch& b = loader.next();
      const auto ii = static_cast<std::size_t>(i);
      sb.plans[ii] = m.draw_plan(rng, static_cast<std::uint64_t>(s * accum + i), micro);
      if constexpr (kLoaderViews) {
        if (!copy_views) {
          micro_batches[ii] = {b.view1, b.view2, &sb.plans[ii].masks};
          continue;
        }
      }
      sb.x1[ii].resize(b.view1.shape());
      sb.x2[ii].resize(b.view2.shape());
      ops::upload_converted(TensorView<float>(b.view1), TensorView<T, D>(sb.x1[ii]), sb.stage);
      ops::upload_converted(TensorView<float>(b.view2), TensorView<T, D>(sb.x2[ii]), sb.stage);
      micro_batches[ii] = {sb.x1[ii], sb.x2[ii], &sb.plans[ii].masks};
    }
  };
  auto hyper = [](const MocaSchedule& sc, std::int64_t s) {
    const MocaSchedule::Values v = sc.at(s);
    return MocaHyper{v.lr, v.weight_decay, v.momentum, sc.wgen_lr, sc.wgen_weight_decay};
  };

  // Plan the length.
  if (!run.contains("steps")) {
    run["steps_per_epoch"] = steps_per_epoch;
    if (run.at("length").contains("epochs")) {
      run["steps"] = std::max<std::int64_t>(
          1, static_cast<std::int64_t>(std::llround(run.at("length").at("epochs").get<double>() *
                                                    static_cast<double>(steps_per_epoch))));
    } else {
      // Time a throwaway model: three warm-up steps (the first sizes every buffer; meanwhile
      // the loader fills its prefetch queue on the same cores), then two timed ones. Timing
      // the two steps right after the first gave 1.87 s against a steady 1.65 s in the README
      // run, which then trained 7.9 of its 9 minutes.
      constexpr int kWarmup = 3, kTimed = 2;
      const auto t0 = Clock::now();
      double per_step = 0;
      {
        Model probe(cfg);
        probe.initialize(seed);
        run["steps"] = 1000;
        const MocaSchedule sc = make_schedule(run);
        std::fprintf(stderr, "  timing a few steps to plan %g minutes...\n",
                     run.at("length").at("minutes").get<double>());
        for (int s = 0; s < kWarmup + kTimed; ++s) {
          const auto ts = Clock::now();
          load_step(s, probe);
          probe.train_step(std::span<const typename Model::MicroBatch>(micro_batches),
                           sb.plans.back().refresh, hyper(sc, s));
          if (s >= kWarmup) per_step += seconds_since(ts) / kTimed;
        }
      }
      loader.seek(0, 0);
      const double budget = run.at("length").at("minutes").get<double>() * 60.0 - seconds_since(t0);
      run["steps"] = std::max<std::int64_t>(1, static_cast<std::int64_t>(budget / per_step));
      std::fprintf(stderr, "  %.2f s per step: %lld steps planned\n", per_step,
                   static_cast<long long>(run.at("steps").get<std::int64_t>()));
    }
  }
  MOCA_CHECK(run.at("steps_per_epoch").get<std::int64_t>() == steps_per_epoch,
             "--resume: the data set now gives ", steps_per_epoch, " steps per epoch, the run "
             "was planned with ", run.at("steps_per_epoch").get<std::int64_t>(),
             " (did the data change?)");
  const std::int64_t total = run.at("steps").get<std::int64_t>();
  const MocaSchedule schedule = make_schedule(run);
  const double limit_s = run.at("length").contains("minutes")
                             ? run.at("length").at("minutes").get<double>() * 60.0
                             : std::numeric_limits<double>::infinity();
  std::fprintf(stderr, "  schedule  %lld steps (%.2f epochs), peak lr %.3g, warmup %.0f%%, wd %g -> %g, "
               "momentum %g -> %g\n  output    %s\n",
               static_cast<long long>(total), schedule.max_epochs, schedule.peak_lr,
               100.0 * run.at("schedule").at("warmup_fraction").get<double>(), schedule.wd_start,
               schedule.wd_end, schedule.momentum_start, schedule.momentum_end,
               out.string().c_str());

  // The model, fresh or from the checkpoint.
  Model moca(cfg);
  moca.initialize(seed);
  std::int64_t step = 0;
  double elapsed_before = 0;  // wall seconds of earlier parts of the run
  double train_before = 0;    // of which training (not evaluation)
  std::error_code ec;
  fs::create_directories(out, ec);
  MOCA_CHECK(!ec, "cannot create the output folder ", out.string(), ": ", ec.message());
  train::JsonlLog log;
  Curves curves;
  if (resume_dir) {
    const auto weights = SafetensorsFile::open(*resume_dir / kWeightsFile);
    load_moca_weights(moca, weights);
    const auto state = SafetensorsFile::open(*resume_dir / kStateFile);
    step = load_moca_train_state(moca, state);
    if (const auto e = state.metadata("elapsed_s")) elapsed_before = std::stod(*e);
    if (const auto e = state.metadata("train_s")) train_before = std::stod(*e);
    log = train::JsonlLog::resume(out / "log.jsonl", step);
    for (const json& r : train::JsonlLog::read(out / "log.jsonl")) curves.add(r);
    std::fprintf(stderr, "  resumed   from %s at step %lld\n", resume_dir->string().c_str(),
                 static_cast<long long>(step));
  } else {
    write_text_atomic(out / "config.json", run.dump(2) + "\n");
    log = train::JsonlLog::create(out / "log.jsonl");
  }
  MOCA_CHECK(step <= total, "--resume: the checkpoint is at step ", step, " but the run plans ",
             total);
  loader.seek((step * accum) / loader.batches_per_epoch(), (step * accum) % loader.batches_per_epoch());

  const auto t_start = Clock::now();
  auto elapsed = [&] { return elapsed_before + seconds_since(t_start); };
  // The time limit counts training only: evaluations and checkpoints do not eat the budget.
  double paused_s = 0;      // seconds of this part spent in evaluations
  auto train_elapsed = [&] { return train_before + seconds_since(t_start) - paused_s; };
  auto epoch_of = [&](std::int64_t s) {
    return static_cast<double>(s) / static_cast<double>(steps_per_epoch);
  };

  auto save = [&](std::int64_t s) {
    if (const auto l = ckpts.latest(); l && train::CheckpointDir::step_of(*l) == s) return;
    const std::string model_json = config_to_json(cfg).dump();
    ckpts.save(s, [&](const fs::path& dir) {
      save_moca_weights(moca, dir / kWeightsFile, {{kConfigKey, model_json}});
      save_moca_train_state(moca, s, dir / kStateFile,
                            {{kRunKey, run.dump()},
                             {"elapsed_s", fmt("%.3f", elapsed())},
                             {"train_s", fmt("%.3f", train_elapsed())}});
    });
  };

  auto evaluate = [&](std::int64_t s, const char* when) {
    if (!can_knn) return;
    VisionTransformer<T, D>& enc = o.knn_student ? moca.encoder : moca.encoder_teacher;
    const auto t0 = Clock::now();
    KnnProtocol protocol;
    protocol.pooling = knn_pool;
    protocol.ks = o.knn_k;
    protocol.temperature = o.knn_temperature;
    protocol.batch = o.knn_batch;
    protocol.bank_limit = o.knn_bank;
    protocol.query_limit = o.knn_queries;
    protocol.workers = std::max(1, o.workers);
    protocol.poll = [] {
      if (g_interrupts.load() > 0) throw Interrupted{};
    };
    const KnnResult r = run_knn_protocol(enc, data, aug, protocol);
    const eval::KnnAccuracy& shown = r.accuracy.back();  // the last k drawn in the curve
    for (const eval::KnnAccuracy& a : r.accuracy) {
      json rec = {{"step", s},
                  {"epoch", epoch_of(s)},
                  {"elapsed_s", elapsed()},
                  {"event", when},
                  {"encoder", o.knn_student ? "student" : "teacher"},
                  {"pool", o.knn_pool},
                  {"k", a.k},
                  {"temperature", a.temperature},
                  {"knn_top1", a.top1},
                  {"knn_top5", a.top5},
                  {"bank", r.bank},
                  {"queries", r.queries},
                  {"eval_s", seconds_since(t0)}};
      log.write(rec);
      std::fprintf(stderr, "k-NN (%s, %s, k=%lld, T=%g) at step %lld: top-1 %.2f%%  top-5 %.2f%%\n",
                   o.knn_student ? "student" : "teacher", o.knn_pool.c_str(),
                   static_cast<long long>(a.k), a.temperature, static_cast<long long>(s),
                   100.0 * a.top1, 100.0 * a.top5);
    }
    curves.add({{"step", s}, {"knn_top1", shown.top1}});
    curves.write(out / "curves.svg");
    paused_s += seconds_since(t0);
  };
  if (!can_knn && (o.knn_every > 0 || o.final_knn || o.knn_init))
    std::fprintf(stderr, "note: no labelled test split: k-NN evaluation is skipped\n");

  std::signal(SIGINT, on_interrupt);
  std::signal(SIGTERM, on_interrupt);
  // An evaluation returns false when Ctrl-C cut it short.
  auto try_evaluate = [&](std::int64_t s, const char* when) {
    try {
      evaluate(s, when);
      return true;
    } catch (const Interrupted&) {
      std::fprintf(stderr, "\nk-NN evaluation interrupted\n");
      return false;
    }
  };
  if (o.knn_init && step == 0 && !resume_dir) (void)try_evaluate(0, "init");

  train::ProgressBar bar("pretrain", total, step);
  auto last_ckpt = Clock::now();
  auto window_start = Clock::now();
  std::int64_t window_steps = 0;
  double window_data_s = 0;  // time the window's steps waited for their batches
  std::string details;
  enum class Stop { Done, Interrupted, UntilStep, TimeLimit } stop = Stop::Done;
  reset_peak_memory<D>();
  while (step < total) {
    if (g_interrupts.load() > 0) {
      stop = Stop::Interrupted;
      break;
    }
    if (train_elapsed() >= limit_s) {
      stop = Stop::TimeLimit;
      break;
    }
    const auto load_start = Clock::now();
    load_step(step, moca);
    window_data_s += seconds_since(load_start);
    const MocaStepResult res = moca.train_step(
        std::span<const typename Model::MicroBatch>(micro_batches), sb.plans.back().refresh,
        hyper(schedule, step));
    ++step;
    ++window_steps;
    const double window_s = std::max(seconds_since(window_start), 1e-9);
    const double pairs_per_s = static_cast<double>(window_steps * batch) / window_s;
    details = "loss " + fmt("%.4f", res.loss) + " (img " + fmt("%.3f", res.l_img) + ", loc " +
              fmt("%.3f", res.l_loc) + ") lr " + fmt("%.2e", res.lr) + " | " +
              fmt("%.1f", pairs_per_s) + " pairs/s";
    if (step % o.log_every == 0 || step == 1 || step == total) {
      const json rec = {{"step", step},
                        {"epoch", epoch_of(step)},
                        {"elapsed_s", elapsed()},
                        {"loss", res.loss},
                        {"l_img", res.l_img},
                        {"l_loc", res.l_loc},
                        {"lr", res.lr},
                        {"wd", res.weight_decay},
                        {"momentum", res.momentum},
                        {"grad_norm", res.grad_norm},
                        {"dist_norm", res.dist_norm},
                        {"pairs_per_s", pairs_per_s},
                        // Share of the time the loader made the step wait (0: it kept ahead).
                        {"data_wait_share", std::min(1.0, window_data_s / window_s)},
                        {"peak_mib", static_cast<double>(memory_stats<D>().peak_bytes) /
                                         (1024.0 * 1024.0)}};
      log.write(rec);
      curves.add(rec);
      window_start = Clock::now();
      window_steps = 0;
      window_data_s = 0;
    }
    bar.update(step, details);

    const bool epoch_end = step % steps_per_epoch == 0;
    if (epoch_end && step < total && o.knn_every > 0) {
      const auto epoch = step / steps_per_epoch;
      const double every = o.knn_every;
      if (std::fmod(static_cast<double>(epoch), every) < 1e-9 ||
          std::floor(static_cast<double>(epoch) / every) !=
              std::floor(static_cast<double>(epoch - 1) / every)) {
        (void)try_evaluate(step, "periodic");
        window_start = Clock::now();
        window_steps = 0;
      }
    }
    if (epoch_end || seconds_since(last_ckpt) >= o.ckpt_minutes * 60.0) {
      save(step);
      curves.write(out / "curves.svg");
      last_ckpt = Clock::now();
    }
    if (o.until_step > 0 && step >= o.until_step && step < total) {
      stop = Stop::UntilStep;
      break;
    }
  }
  bar.finish(details);
  save(step);
  curves.write(out / "curves.svg");
  const double peak_mib =
      static_cast<double>(memory_stats<D>().peak_bytes) / (1024.0 * 1024.0);

  switch (stop) {
    case Stop::Interrupted:
      std::fprintf(stderr, "interrupted at step %lld: checkpoint saved in %s; continue with "
                   "--resume\n", static_cast<long long>(step), ckpt_root.string().c_str());
      return 130;
    case Stop::UntilStep:
      std::fprintf(stderr, "stopped after step %lld (--until-step): continue with --resume\n",
                   static_cast<long long>(step));
      return 0;
    case Stop::TimeLimit:
      std::fprintf(stderr, "time limit reached at step %lld of %lld\n",
                   static_cast<long long>(step), static_cast<long long>(total));
      break;
    case Stop::Done:
      break;
  }
  std::fprintf(stderr, "trained %lld steps in %s (peak memory %.0f MiB); checkpoint in %s\n",
               static_cast<long long>(step), train::format_duration(elapsed()).c_str(), peak_mib,
               ckpt_root.string().c_str());
  if (o.final_knn && !try_evaluate(step, "final")) return 130;
  return 0;
}

}  // namespace

int run_pretrain(const PretrainOptions& o, const CLI::App& cmd) {
  MOCA_CHECK(o.device == "cpu" || o.device == "cuda", "--device must be cpu or cuda, got '",
             o.device, "'");
  MOCA_CHECK(o.matmul == "fp32" || o.matmul == "tf32" || o.matmul == "bf16",
             "--matmul must be fp32, tf32 or bf16, got '", o.matmul, "'");
  MOCA_CHECK(o.precision == "fp32" || o.precision == "bf16",
             "--precision must be fp32 or bf16, got '", o.precision, "'");
  MOCA_CHECK(o.matmul == "fp32" || o.device == "cuda", "--matmul ", o.matmul,
             " applies to --device cuda only (the CPU computes in fp32)");
  MOCA_CHECK(o.matmul == "fp32" || o.precision == "fp32", "--matmul ", o.matmul,
             " sets how float products run; with --precision bf16 every product takes bf16 "
             "operands already");
  const bool bf16_storage = o.precision == "bf16";
  require_device(o.device);  // for cuda: a build with the backend, and a GPU
  if (o.device == "cpu")
    return bf16_storage ? pretrain_on<bf16, Cpu>(o, cmd) : pretrain_on<float, Cpu>(o, cmd);
#if MOCA_WITH_CUDA
  cuda::Context::get().set_float_matmul(cuda::parse_float_matmul(o.matmul, "--matmul"));
  return bf16_storage ? pretrain_on<bf16, Cuda>(o, cmd) : pretrain_on<float, Cuda>(o, cmd);
#else
  return 1;  // not reached: require_device has thrown
#endif
}

}  // namespace moca::cli
