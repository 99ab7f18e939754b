// Byte-pair encoding with tiktoken's semantics: split the text into pieces, and within each piece start
// from single bytes and repeatedly merge the adjacent pair whose concatenation has the lowest rank
// (the leftmost such pair on a tie), until no adjacent pair concatenates to a token.
//
// Where the time goes, and what we do about it:
//  - Most pieces of ordinary text are whole tokens (" the", " said"), so each piece is first looked up
//    whole in a hash table; merging runs only for the rest.
//  - Merging works on ranks, not bytes: "does a+b concatenate to a token?" is one lookup of the 64-bit
//    key (a, b) in a table built once from every way of splitting each token into two tokens.
//  - Short pieces merge by rescanning (tiktoken's algorithm, quadratic but tiny); long ones use a heap
//    and a linked list, O(n log n), so a megabyte-long "word" does not stall.
#include <algorithm>
#include <cstring>
#include <queue>
#include <stdexcept>

#include "bpe.h"

namespace nanoslm {

namespace {
constexpr size_t kLongPiece = 128;  // bytes; above this, merge with the heap

inline uint64_t hash_bytes(std::string_view s) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ s.size();
    const char* p = s.data();
    size_t n = s.size();
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        h = (h ^ v) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    h = (h ^ v) * 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 29);
}

inline uint64_t hash_pair(uint64_t key) { return (key * 0x9E3779B97F4A7C15ull) >> 17; }
inline uint64_t pair_key(Rank left, Rank right) { return (uint64_t(left) << 32) | right; }

size_t table_size_for(size_t entries) {
    size_t size = 16;
    while (size < entries * 2) size <<= 1;
    return size;
}
}  // namespace

Encoder::Encoder(std::vector<std::string> token_bytes,
                 std::vector<std::pair<std::string, Rank>> special_tokens)
    : token_bytes_(std::move(token_bytes)), special_tokens_(std::move(special_tokens)) {
    const size_t num_ordinary = token_bytes_.size();
    std::fill(byte_rank_, byte_rank_ + 256, kNoRank);

    piece_table_.assign(table_size_for(num_ordinary), kNoRank);
    const size_t piece_mask = piece_table_.size() - 1;
    for (Rank r = 0; r < num_ordinary; ++r) {
        const std::string& bytes = token_bytes_[r];
        if (bytes.empty()) continue;
        if (bytes.size() == 1) byte_rank_[static_cast<unsigned char>(bytes[0])] = r;
        size_t slot = hash_bytes(bytes) & piece_mask;
        while (piece_table_[slot] != kNoRank) {
            if (token_bytes_[piece_table_[slot]] == bytes)
                throw std::invalid_argument("two ranks share the same bytes");
            slot = (slot + 1) & piece_mask;
        }
        piece_table_[slot] = r;
    }
    for (int b = 0; b < 256; ++b)
        if (byte_rank_[b] == kNoRank)
            throw std::invalid_argument("the vocabulary has no token for the single byte " + std::to_string(b) +
                                        "; a byte-level BPE vocabulary needs all 256");

    std::vector<std::pair<uint64_t, Rank>> pairs;
    for (Rank r = 0; r < num_ordinary; ++r) {
        std::string_view bytes = token_bytes_[r];
        for (size_t k = 1; k < bytes.size(); ++k) {
            Rank left = piece_rank(bytes.substr(0, k)), right = piece_rank(bytes.substr(k));
            if (left != kNoRank && right != kNoRank) pairs.emplace_back(pair_key(left, right), r);
        }
    }
    pair_keys_.assign(table_size_for(pairs.size()), ~0ull);
    pair_ranks_.assign(pair_keys_.size(), kNoRank);
    const size_t pair_mask = pair_keys_.size() - 1;
    for (auto [key, r] : pairs) {
        size_t slot = hash_pair(key) & pair_mask;
        while (pair_keys_[slot] != ~0ull) slot = (slot + 1) & pair_mask;
        pair_keys_[slot] = key;
        pair_ranks_[slot] = r;
    }

    n_vocab_ = num_ordinary;
    for (auto& [text, id] : special_tokens_) {
        if (text.empty()) throw std::invalid_argument("a special token cannot be the empty string");
        if (id == kNoRank) throw std::invalid_argument("special token id " + std::to_string(id) + " is reserved");
        if (id < num_ordinary && !token_bytes_[id].empty())
            throw std::invalid_argument("special token id " + std::to_string(id) + " is already an ordinary token");
        auto [given, first] = special_bytes_.emplace(id, text);
        if (!first && given->second != text)  // encode would emit id for one, decode give the other's text
            throw std::invalid_argument("special token id " + std::to_string(id) + " is given to two tokens");
        n_vocab_ = std::max<size_t>(n_vocab_, size_t(id) + 1);
    }
}

const std::string* Encoder::bytes_of(Rank id) const {
    if (id < token_bytes_.size() && !token_bytes_[id].empty()) return &token_bytes_[id];
    auto found = special_bytes_.find(id);
    return found == special_bytes_.end() ? nullptr : &found->second;
}

Rank Encoder::piece_rank(std::string_view piece) const {
    const size_t mask = piece_table_.size() - 1;
    for (size_t slot = hash_bytes(piece) & mask;; slot = (slot + 1) & mask) {
        Rank r = piece_table_[slot];
        if (r == kNoRank) return kNoRank;
        if (token_bytes_[r] == piece) return r;
    }
}

Rank Encoder::pair_rank(Rank left, Rank right) const {
    const uint64_t key = pair_key(left, right);
    const size_t mask = pair_keys_.size() - 1;
    for (size_t slot = hash_pair(key) & mask;; slot = (slot + 1) & mask) {
        if (pair_keys_[slot] == key) return pair_ranks_[slot];
        if (pair_keys_[slot] == ~0ull) return kNoRank;
    }
}

void Encoder::merge_short_piece(std::string_view piece, std::vector<Rank>* out) const {
    // parts[i] is a token; pair_ranks[i] is the rank of parts[i] + parts[i + 1], or kNoRank.
    Rank parts[kLongPiece], pair_ranks[kLongPiece];
    size_t n = piece.size();
    for (size_t i = 0; i < n; ++i) parts[i] = byte_rank_[static_cast<unsigned char>(piece[i])];
    for (size_t i = 0; i + 1 < n; ++i) pair_ranks[i] = pair_rank(parts[i], parts[i + 1]);
    while (n > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < n; ++i)
            if (pair_ranks[i] < pair_ranks[best]) best = i;
        if (pair_ranks[best] == kNoRank) break;
        parts[best] = pair_ranks[best];
        std::memmove(parts + best + 1, parts + best + 2, (n - best - 2) * sizeof(Rank));
        std::memmove(pair_ranks + best, pair_ranks + best + 1, (n - best - 2) * sizeof(Rank));
        --n;
        if (best + 1 < n) pair_ranks[best] = pair_rank(parts[best], parts[best + 1]);
        if (best > 0) pair_ranks[best - 1] = pair_rank(parts[best - 1], parts[best]);
    }
    out->insert(out->end(), parts, parts + n);
}

void Encoder::merge_long_piece(std::string_view piece, std::vector<Rank>* out) const {
    // The same merges in O(n log n): a doubly linked list of parts and a min-heap of candidate pairs
    // keyed by (rank, position of the left part); entries made stale by earlier merges are skipped.
    const size_t n = piece.size();
    std::vector<Rank> parts(n);
    std::vector<size_t> prev(n), next(n);
    std::vector<bool> alive(n, true);
    for (size_t i = 0; i < n; ++i) {
        parts[i] = byte_rank_[static_cast<unsigned char>(piece[i])];
        prev[i] = i - 1;  // wraps to SIZE_MAX for the first part
        next[i] = i + 1;  // == n for the last part
    }
    using Candidate = std::pair<Rank, size_t>;  // (rank of the merged token, left position)
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
    for (size_t i = 0; i + 1 < n; ++i) {
        Rank r = pair_rank(parts[i], parts[i + 1]);
        if (r != kNoRank) heap.emplace(r, i);
    }
    while (!heap.empty()) {
        auto [rank, left] = heap.top();
        heap.pop();
        if (!alive[left] || next[left] >= n) continue;
        size_t right = next[left];
        if (pair_rank(parts[left], parts[right]) != rank) continue;  // stale
        parts[left] = rank;
        alive[right] = false;
        next[left] = next[right];
        if (next[left] < n) prev[next[left]] = left;
        if (prev[left] != size_t(-1)) {
            Rank r = pair_rank(parts[prev[left]], parts[left]);
            if (r != kNoRank) heap.emplace(r, prev[left]);
        }
        if (next[left] < n) {
            Rank r = pair_rank(parts[left], parts[next[left]]);
            if (r != kNoRank) heap.emplace(r, left);
        }
    }
    for (size_t i = 0; i < n; i = next[i]) out->push_back(parts[i]);
}

void Encoder::encode_piece(std::string_view piece, std::vector<Rank>* out) const {
    if (piece.size() == 1) {
        out->push_back(byte_rank_[static_cast<unsigned char>(piece[0])]);
        return;
    }
    Rank whole = piece_rank(piece);
    if (whole != kNoRank) out->push_back(whole);
    else if (piece.size() <= kLongPiece) merge_short_piece(piece, out);
    else merge_long_piece(piece, out);
}

void Encoder::encode_ordinary(std::string_view text, std::vector<Rank>* out) const {
    pretokenize(text, [&](std::string_view piece) { encode_piece(piece, out); });
}

void Encoder::encode(std::string_view text, const std::vector<std::string>& allowed_special,
                     std::vector<Rank>* out) const {
    std::vector<std::string_view> allowed;
    std::vector<Rank> allowed_ids;
    for (const std::string& name : allowed_special)
        for (auto& [text_of, id] : special_tokens_)
            if (text_of == name) {
                allowed.push_back(text_of);
                allowed_ids.push_back(id);
            }
    SpecialFinder finder(text, allowed);
    size_t pos = 0;
    while (pos < text.size()) {
        auto [start, which] = finder.next(pos);
        if (start == std::string_view::npos) {
            encode_ordinary(text.substr(pos), out);
            break;
        }
        encode_ordinary(text.substr(pos, start - pos), out);
        out->push_back(allowed_ids[which]);
        pos = start + allowed[which].size();
    }
}

std::string Encoder::decode_bytes(const std::vector<Rank>& ids) const {
    size_t total = 0;
    for (Rank id : ids) {
        const std::string* token = bytes_of(id);
        if (!token)
            throw std::out_of_range("token id " + std::to_string(id) + " is not in the vocabulary (n_vocab " +
                                    std::to_string(n_vocab_) + ")");
        total += token->size();
    }
    std::string bytes;
    bytes.reserve(total);
    for (Rank id : ids) bytes += *bytes_of(id);
    return bytes;
}

}  // namespace nanoslm
