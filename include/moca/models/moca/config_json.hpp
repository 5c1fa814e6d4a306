// MocaConfig (and the ViT and decoder configurations inside it) as JSON: the form in which a
// checkpoint records the architecture it holds, so that evaluation and resumption need no flags.
//
//   nlohmann::json j = moca::config_to_json(cfg);
//   MocaConfig back = moca::moca_config_from_json(j, "run/config.json");  // names the source on error
//
// Reading is strict: every key must be present with the right type and no unknown key may appear,
// so a file from another version or a typo fails loudly instead of silently taking a default.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/models/moca/moca.hpp"
#include "moca/models/vit.hpp"

namespace moca {

inline nlohmann::json config_to_json(const VitConfig& c) {
  return {{"img_size", c.img_size}, {"patch", c.patch},         {"in_chans", c.in_chans},
          {"dim", c.dim},           {"depth", c.depth},         {"heads", c.heads},
          {"mlp_ratio", c.mlp_ratio}, {"norm_eps", c.norm_eps}};
}

inline nlohmann::json config_to_json(const DecoderConfig& c) {
  return {{"dim", c.dim},
          {"depth", c.depth},
          {"heads", c.heads},
          {"mlp_ratio", c.mlp_ratio},
          {"norm_eps", c.norm_eps}};
}

inline nlohmann::json config_to_json(const MocaConfig& c) {
  return {{"encoder", config_to_json(c.encoder)},
          {"decoder", config_to_json(c.decoder)},
          {"early_layer", c.early_layer},
          {"num_words", c.num_words},
          {"skip_offset", c.skip_offset},
          {"words_per_iter", c.words_per_iter},
          {"inv_delta", c.inv_delta},
          {"dist_norm_decay", c.dist_norm_decay},
          {"kappa", c.kappa},
          {"pred_mlp_ratio", c.pred_mlp_ratio},
          {"mask_ratio", {c.mask_ratio[0], c.mask_ratio[1]}},
          {"dec_mask_ratio", {c.dec_mask_ratio[0], c.dec_mask_ratio[1]}},
          {"img_weight", c.img_weight},
          {"loc_weight", c.loc_weight},
          {"avg_pooling", c.avg_pooling},
          {"clip_grad", c.clip_grad},
          {"adamw", {{"beta1", c.adamw.beta1}, {"beta2", c.adamw.beta2}, {"eps", c.adamw.eps}}}};
}

namespace detail {

// Reads the JSON object `j` key by key; every error names `source` and the key's path.
class JsonReader {
 public:
  JsonReader(const nlohmann::json& j, std::string source, std::string path)
      : j_(j), source_(std::move(source)), path_(std::move(path)) {
    MOCA_CHECK(j_.is_object(), source_, ": ", where(""), " should be a JSON object, found ",
               j_.type_name());
  }

  template <class V>
  V get(const std::string& key) {
    seen_.insert(key);
    MOCA_CHECK(j_.contains(key), source_, ": missing key ", where(key));
    const nlohmann::json& v = j_.at(key);
    if constexpr (std::is_same_v<V, bool>) {
      MOCA_CHECK(v.is_boolean(), source_, ": ", where(key), " should be true or false");
    } else if constexpr (std::is_integral_v<V>) {
      MOCA_CHECK(v.is_number_integer(), source_, ": ", where(key), " should be an integer");
    } else {
      MOCA_CHECK(v.is_number(), source_, ": ", where(key), " should be a number");
    }
    return v.get<V>();
  }

  void pair(const std::string& key, double (&out)[2]) {
    seen_.insert(key);
    MOCA_CHECK(j_.contains(key), source_, ": missing key ", where(key));
    const nlohmann::json& v = j_.at(key);
    MOCA_CHECK(v.is_array() && v.size() == 2 && v[0].is_number() && v[1].is_number(), source_,
               ": ", where(key), " should be a pair of numbers");
    out[0] = v[0].get<double>();
    out[1] = v[1].get<double>();
  }

  /// The raw value of a key that must be present.
  const nlohmann::json& value(const std::string& key) {
    seen_.insert(key);
    MOCA_CHECK(j_.contains(key), source_, ": missing key ", where(key));
    return j_.at(key);
  }

  JsonReader child(const std::string& key) {
    const nlohmann::json& v = value(key);
    return JsonReader(v, source_, path_.empty() ? key : path_ + "." + key);
  }

  /// Fails on a key that was never asked for.
  void finish() const {
    for (const auto& [key, value] : j_.items())
      MOCA_CHECK(seen_.count(key), source_, ": unknown key ", where(key));
  }

 private:
  std::string where(const std::string& key) const {
    if (key.empty()) return path_.empty() ? std::string("the document") : "'" + path_ + "'";
    return "'" + (path_.empty() ? key : path_ + "." + key) + "'";
  }

  const nlohmann::json& j_;
  std::string source_, path_;
  std::set<std::string> seen_;
};

}  // namespace detail

inline VitConfig vit_config_from_json(const nlohmann::json& j, const std::string& source,
                                      const std::string& path = "") {
  detail::JsonReader r(j, source, path);
  VitConfig c;
  c.img_size = r.get<std::int64_t>("img_size");
  c.patch = r.get<std::int64_t>("patch");
  c.in_chans = r.get<std::int64_t>("in_chans");
  c.dim = r.get<std::int64_t>("dim");
  c.depth = r.get<std::int64_t>("depth");
  c.heads = r.get<std::int64_t>("heads");
  c.mlp_ratio = r.get<double>("mlp_ratio");
  c.norm_eps = r.get<double>("norm_eps");
  r.finish();
  return c;
}

inline MocaConfig moca_config_from_json(const nlohmann::json& j, const std::string& source) {
  detail::JsonReader r(j, source, "");
  MocaConfig c;
  c.encoder = vit_config_from_json(r.value("encoder"), source, "encoder");
  {
    detail::JsonReader d = r.child("decoder");
    c.decoder.dim = d.get<std::int64_t>("dim");
    c.decoder.depth = d.get<std::int64_t>("depth");
    c.decoder.heads = d.get<std::int64_t>("heads");
    c.decoder.mlp_ratio = d.get<double>("mlp_ratio");
    c.decoder.norm_eps = d.get<double>("norm_eps");
    d.finish();
  }
  c.early_layer = r.get<std::int64_t>("early_layer");
  c.num_words = r.get<std::int64_t>("num_words");
  c.skip_offset = r.get<std::int64_t>("skip_offset");
  c.words_per_iter = r.get<std::int64_t>("words_per_iter");
  c.inv_delta = r.get<double>("inv_delta");
  c.dist_norm_decay = r.get<double>("dist_norm_decay");
  c.kappa = r.get<double>("kappa");
  c.pred_mlp_ratio = r.get<double>("pred_mlp_ratio");
  r.pair("mask_ratio", c.mask_ratio);
  r.pair("dec_mask_ratio", c.dec_mask_ratio);
  c.img_weight = r.get<double>("img_weight");
  c.loc_weight = r.get<double>("loc_weight");
  c.avg_pooling = r.get<bool>("avg_pooling");
  c.clip_grad = r.get<double>("clip_grad");
  {
    detail::JsonReader a = r.child("adamw");
    c.adamw.beta1 = a.get<double>("beta1");
    c.adamw.beta2 = a.get<double>("beta2");
    c.adamw.eps = a.get<double>("eps");
    a.finish();
  }
  r.finish();
  try {
    c.validate();
  } catch (const Error& e) {
    MOCA_CHECK(false, source, ": invalid MOCA configuration: ", e.what());
  }
  return c;
}

/// The keys (dotted paths) whose values differ between two configurations; empty when equal.
inline std::vector<std::string> config_differences(const nlohmann::json& a,
                                                   const nlohmann::json& b,
                                                   const std::string& path = "") {
  std::vector<std::string> out;
  if (a.is_object() && b.is_object()) {
    std::set<std::string> keys;
    for (const auto& [k, v] : a.items()) keys.insert(k);
    for (const auto& [k, v] : b.items()) keys.insert(k);
    for (const std::string& k : keys) {
      const std::string p = path.empty() ? k : path + "." + k;
      if (!a.contains(k) || !b.contains(k)) {
        out.push_back(p);
        continue;
      }
      const auto sub = config_differences(a.at(k), b.at(k), p);
      out.insert(out.end(), sub.begin(), sub.end());
    }
  } else if (a != b) {
    out.push_back(path.empty() ? std::string("(document)") : path + " (" + a.dump() + " vs " +
                                                                 b.dump() + ")");
  }
  return out;
}

}  // namespace moca
