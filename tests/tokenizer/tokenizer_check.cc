// Test driver for the tokenizer oracle test (tokenizer_oracle.py): encodes and decodes a batch
// of inputs with the C++ tokenizer and writes what it got, for comparison with `tokenizers`.
//   tokenizer_check TOKENIZER_JSON IN.json OUT.json
// IN: {"texts": [hex bytes, ...], "id_lists": [[id, ...], ...]}
// OUT: {"encodings": [[id, ...]], "decodes": [hex], "streams": [[hex chunk per push, finish]],
//       "id_decodes": [hex], "id_streams": [[hex chunk]], "encode_seconds": [s per text]}
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace {

std::string to_hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

std::string from_hex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2)
    out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

nlohmann::json stream(const sp::Tokenizer& tok, const std::vector<int32_t>& ids) {
  sp::Detokenizer d(tok);
  nlohmann::json chunks = nlohmann::json::array();
  for (int32_t id : ids) chunks.push_back(to_hex(d.push(id)));
  chunks.push_back(to_hex(d.finish()));
  return chunks;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: tokenizer_check TOKENIZER_JSON IN.json OUT.json\n");
    return 2;
  }
  auto t0 = std::chrono::steady_clock::now();
  auto tok = sp::Tokenizer::load(argv[1]);
  if (!tok) {
    std::fprintf(stderr, "error: %s\n", tok.status().message().c_str());
    return 2;
  }
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::ifstream in(argv[2]);
  nlohmann::json req = nlohmann::json::parse(in);
  nlohmann::json out;
  out["load_seconds"] = load_s;
  out["vocab_size"] = (*tok)->vocab_size();
  for (const auto& h : req["texts"]) {
    const std::string text = from_hex(h.get<std::string>());
    auto s = std::chrono::steady_clock::now();
    auto ids = (*tok)->encode(text);
    out["encode_seconds"].push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count());
    if (!ids) {
      std::fprintf(stderr, "error: %s\n", ids.status().message().c_str());
      return 1;
    }
    out["encodings"].push_back(*ids);
    out["decodes"].push_back(to_hex((*tok)->decode(*ids)));
    out["streams"].push_back(stream(**tok, *ids));
  }
  for (const auto& l : req["id_lists"]) {
    const auto ids = l.get<std::vector<int32_t>>();
    out["id_decodes"].push_back(to_hex((*tok)->decode(ids)));
    out["id_decodes_skip_special"].push_back(to_hex((*tok)->decode(ids, true)));
    out["id_streams"].push_back(stream(**tok, ids));
  }
  std::ofstream(argv[3]) << out.dump();
  return 0;
}
