// The native core of nanoslm's tokenizer: the GPT-2 pre-tokenizer, byte-pair encoding with tiktoken's
// semantics, and a byte-level BPE trainer. No Python here; csrc/bindings.cpp wraps it.
#pragma once
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "unicode_table.h"

namespace nanoslm {

using Rank = uint32_t;  // a token id; in a BPE vocabulary a lower rank merges first
constexpr Rank kNoRank = 0xFFFFFFFFu;

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer: splits text into pieces exactly as the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// does with leftmost-first alternation. Text must be valid UTF-8 (Python str always is).

CharClass char_class(uint32_t codepoint);

// Decodes the code point starting at s[0], writing its length in bytes to *len.
inline uint32_t decode_utf8(const unsigned char* s, size_t* len) {
    unsigned char c = s[0];
    if (c < 0x80) { *len = 1; return c; }
    if (c < 0xE0) { *len = 2; return ((c & 0x1Fu) << 6) | (s[1] & 0x3Fu); }
    if (c < 0xF0) { *len = 3; return ((c & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu); }
    *len = 4;
    return ((c & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
}

// Returns the end (byte offset) of the piece that starts at `pos`.
size_t next_piece_end(std::string_view text, size_t pos);

// Calls emit(std::string_view piece) for every piece of text, in order.
template <class Emit>
void pretokenize(std::string_view text, Emit&& emit) {
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = next_piece_end(text, pos);
        emit(text.substr(pos, end - pos));
        pos = end;
    }
}

// Number of bytes of the longest prefix of s that is valid UTF-8 (== s.size() when all of it is).
size_t valid_utf8_prefix(std::string_view s);

// Runs worker(t) for t in [0, n), t = 0 on the calling thread, and returns when all are done. The workers
// must share their work out dynamically: a thread the system cannot start leaves its share to the others.
// The first exception a worker throws is rethrown here, once every thread has stopped.
template <class Worker>
void run_on_threads(int n, Worker&& worker) {
    std::exception_ptr error;
    std::mutex error_mutex;
    auto guarded = [&](int t) {
        try {
            worker(t);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
        }
    };
    std::vector<std::thread> threads;
    for (int t = 1; t < n; ++t) {
        try {
            threads.emplace_back(guarded, t);
        } catch (const std::system_error&) {
            break;  // no more threads to be had: the ones running do the rest
        }
    }
    guarded(0);
    for (auto& th : threads) th.join();
    if (error) std::rethrow_exception(error);
}

// Finds special tokens in a text from left to right: the earliest at or after a position, the longest of
// those that start there. Each token's next occurrence is remembered and searched again only once the
// position has passed it, so a text with many special tokens is read once per token, not once per find.
class SpecialFinder {
  public:
    SpecialFinder(std::string_view text, std::vector<std::string_view> specials)
        : text_(text), specials_(std::move(specials)), at_(specials_.size()) {
        for (size_t i = 0; i < specials_.size(); ++i) at_[i] = text_.find(specials_[i]);
    }
    // (start, index into specials) of the next one at or after pos; start is npos when none is left.
    std::pair<size_t, size_t> next(size_t pos) {
        size_t best = std::string_view::npos, best_i = 0;
        for (size_t i = 0; i < specials_.size(); ++i) {
            if (at_[i] != std::string_view::npos && at_[i] < pos) at_[i] = text_.find(specials_[i], pos);
            if (at_[i] < best || (at_[i] == best && best != std::string_view::npos &&
                                  specials_[i].size() > specials_[best_i].size())) {
                best = at_[i];
                best_i = i;
            }
        }
        return {best, best_i};
    }

  private:
    std::string_view text_;
    std::vector<std::string_view> specials_;  // none empty: an empty one would match everywhere
    std::vector<size_t> at_;
};

// ---------------------------------------------------------------------------------------------
// Encoder: text -> token ids with a fixed vocabulary, byte-identical to tiktoken's CoreBPE.

class Encoder {
  public:
    // token_bytes[r] is the byte string of rank r (empty for a rank that is unused);
    // special_tokens are (text, id) pairs that encode() may be allowed to emit.
    Encoder(std::vector<std::string> token_bytes,
            std::vector<std::pair<std::string, Rank>> special_tokens);

    // Appends the ids of text, ignoring special tokens, to out.
    void encode_ordinary(std::string_view text, std::vector<Rank>* out) const;
    // As encode_ordinary, but the given special tokens (a subset of the encoder's) become their ids.
    void encode(std::string_view text, const std::vector<std::string>& allowed_special,
                std::vector<Rank>* out) const;
    // The bytes of the given ids; throws std::out_of_range naming an unknown id.
    std::string decode_bytes(const std::vector<Rank>& ids) const;

    size_t n_vocab() const { return n_vocab_; }

  private:
    void encode_piece(std::string_view piece, std::vector<Rank>* out) const;
    void merge_short_piece(std::string_view piece, std::vector<Rank>* out) const;
    void merge_long_piece(std::string_view piece, std::vector<Rank>* out) const;
    Rank piece_rank(std::string_view piece) const;
    Rank pair_rank(Rank left, Rank right) const;
    const std::string* bytes_of(Rank id) const;  // null for an unused id

    std::vector<std::string> token_bytes_;  // rank -> bytes of the ordinary tokens
    // Special tokens' bytes by id, apart: an id far past the ordinary ranks (say 2**31 - 1) is then one entry,
    // not a table of 2**31 empty strings (64 GB).
    std::unordered_map<Rank, std::string> special_bytes_;
    size_t n_vocab_ = 0;
    Rank byte_rank_[256];
    // Open-addressing hash tables (power-of-two sizes, linear probing): piece bytes -> rank, and
    // (left rank, right rank) -> rank of their concatenation, when that concatenation is a token.
    std::vector<Rank> piece_table_;
    std::vector<uint64_t> pair_keys_;
    std::vector<Rank> pair_ranks_;
    std::vector<std::pair<std::string, Rank>> special_tokens_;
};

// ---------------------------------------------------------------------------------------------
// Trainer: learns byte-level BPE merges from text, GPT-2 pre-tokenization within each piece.

class BpeTrainer {
  public:
    explicit BpeTrainer(std::vector<std::string> special_tokens);
    // Counts the pieces of each text (split at special tokens first); may be called many times.
    void add_texts(const std::vector<std::string>& texts, int num_threads);
    // Learns up to num_merges merges. Returns (left, right) id pairs; merge k makes token 256 + k.
    std::vector<std::pair<Rank, Rank>> train(int num_merges) const;
    size_t num_unique_pieces() const { return pieces_.size(); }

  private:
    std::vector<std::string> special_tokens_;
    std::unordered_map<std::string, uint64_t> pieces_;  // unique piece -> number of occurrences
};

// ---------------------------------------------------------------------------------------------
// Batch gathering: rows data[offsets[b] : offsets[b] + T] into x and the same shifted by one into y.

template <class Token>
void gather_batch(const Token* data, const int64_t* offsets, int64_t batch_size, int64_t block_size,
                  int64_t* x, int64_t* y);

}  // namespace nanoslm
