// libFuzzer harness: the file-backed datasets' readers (a uint16 token file, a text file), on
// bytes written to a temporary file, then a batch drawn from whatever they accept.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>

#include "worker/data/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/mamba-fuzz-data-" + std::to_string(getpid());
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  const int vocab = size > 0 ? 1 + data[0] * 256 : 1;
  for (int kind = 0; kind < 2; ++kind) {
    mamba::v1::DataSpec spec;
    if (kind == 0) {
      spec.mutable_token_file()->set_path(path);
      spec.mutable_token_file()->set_seq_len(8);
      spec.mutable_token_file()->set_vocab_size(vocab);
    } else {
      spec.mutable_text_file()->set_path(path);
      spec.mutable_text_file()->set_seq_len(8);
    }
    auto dataset = mamba::data::MakeDataset(spec, 7);
    if (!dataset.ok()) continue;
    (void)(*dataset)->GetBatch(mamba::data::Split::kTrain, 3, 0, 2, 8);
    (void)(*dataset)->GetBatch(mamba::data::Split::kValidation, 0, 0, 1, 8);
  }
  return 0;
}
