#include "checkpoints/json_reader.h"

#include "absl/strings/str_cat.h"

namespace mamba::ckpt {
namespace {

// A SAX pass that only counts the nesting (no recursion, no document), stopping past the bound.
class DepthCheck : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit DepthCheck(int max_depth) : max_depth_(max_depth) {}
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return Enter(); }
  bool key(string_t&) override { return true; }
  bool end_object() override { return Leave(); }
  bool start_array(std::size_t) override { return Enter(); }
  bool end_array() override { return Leave(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }
  bool too_deep() const { return too_deep_; }

 private:
  bool Enter() {
    if (++depth_ > max_depth_) too_deep_ = true;
    return !too_deep_;
  }
  bool Leave() {
    --depth_;
    return true;
  }
  int max_depth_, depth_ = 0;
  bool too_deep_ = false;
};

}  // namespace

absl::StatusOr<nlohmann::json> ParseJsonBounded(std::string_view text, const std::string& label,
                                                int max_depth) {
  DepthCheck check(max_depth);
  const bool ok = nlohmann::json::sax_parse(text.begin(), text.end(), &check,
                                            nlohmann::json::input_format_t::json, false);
  if (check.too_deep()) {
    return absl::DataLossError(
        absl::StrCat(label, ": JSON nested deeper than ", max_depth, " levels"));
  }
  if (!ok) return absl::DataLossError(absl::StrCat(label, ": not valid JSON"));
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) return absl::DataLossError(absl::StrCat(label, ": not valid JSON"));
  return j;
}

std::string ShortJson(const nlohmann::json& value) {
  std::string s = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

}  // namespace mamba::ckpt
