// Byte-level BPE training. Text is split at special tokens, then into pieces by the GPT-2 pattern;
// identical pieces are counted once with their frequency (a corpus has far fewer distinct pieces than
// pieces). Then, repeatedly: take the most frequent adjacent pair of tokens over all pieces (ties go to
// the lexicographically greater pair of byte strings, comparing the left strings first), make it a new
// token, and rewrite the pieces that contain it.
//
// Pair counts are updated incrementally: only the pieces holding the merged pair are touched. A max-heap
// orders the pairs; its entries may be stale. Once a merge is done, every pair that does not contain the
// new token can only lose occurrences, so a popped entry whose count is out of date is pushed back with
// its current count, and the first up-to-date entry popped is the true maximum.
#include <algorithm>
#include <atomic>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "bpe.h"

namespace nanoslm {

namespace {
inline uint64_t pair_key(Rank left, Rank right) { return (uint64_t(left) << 32) | right; }
inline Rank left_of(uint64_t key) { return Rank(key >> 32); }
inline Rank right_of(uint64_t key) { return Rank(key & 0xFFFFFFFFu); }

// Calls emit(segment) for each stretch of text between special tokens.
template <class Emit>
void split_at_specials(std::string_view text, const std::vector<std::string>& specials, Emit&& emit) {
    SpecialFinder finder(text, std::vector<std::string_view>(specials.begin(), specials.end()));
    size_t pos = 0;
    while (true) {
        auto [start, which] = finder.next(pos);
        if (start == std::string_view::npos) {
            emit(text.substr(pos));
            return;
        }
        emit(text.substr(pos, start - pos));
        pos = start + specials[which].size();
    }
}
}  // namespace

BpeTrainer::BpeTrainer(std::vector<std::string> special_tokens) : special_tokens_(std::move(special_tokens)) {
    special_tokens_.erase(std::remove(special_tokens_.begin(), special_tokens_.end(), std::string()),
                          special_tokens_.end());
}

void BpeTrainer::add_texts(const std::vector<std::string>& texts, int num_threads) {
    num_threads = std::max(1, std::min<int>(num_threads, int(texts.size())));
    std::vector<std::unordered_map<std::string_view, uint64_t>> counts(num_threads);
    std::atomic<size_t> next_text{0};
    auto worker = [&](int t) {
        auto& local = counts[t];
        for (size_t i; (i = next_text.fetch_add(1)) < texts.size();)
            split_at_specials(texts[i], special_tokens_, [&](std::string_view segment) {
                pretokenize(segment, [&](std::string_view piece) { ++local[piece]; });
            });
    };
    run_on_threads(num_threads, worker);
    for (auto& local : counts)
        for (auto& [piece, count] : local) pieces_[std::string(piece)] += count;
}

std::vector<std::pair<Rank, Rank>> BpeTrainer::train(int num_merges) const {
    // Words: each distinct piece as a sequence of token ids, with its count. Single bytes have no pairs.
    std::vector<std::vector<Rank>> words;
    std::vector<int64_t> word_counts;
    for (auto& [piece, count] : pieces_) {
        if (piece.size() < 2) continue;
        words.emplace_back(piece.begin(), piece.end());
        for (Rank& id : words.back()) id = static_cast<unsigned char>(id);
        word_counts.push_back(int64_t(count));
    }
    std::vector<std::string> token_bytes(256);
    for (int b = 0; b < 256; ++b) token_bytes[b] = std::string(1, char(b));

    std::unordered_map<uint64_t, int64_t> pair_counts;
    std::unordered_map<uint64_t, std::vector<uint32_t>> pair_words;  // pair -> words that held it once
    auto note_word = [&](uint64_t key, uint32_t w) {
        auto& list = pair_words[key];
        if (list.empty() || list.back() != w) list.push_back(w);
    };
    for (uint32_t w = 0; w < words.size(); ++w)
        for (size_t i = 0; i + 1 < words[w].size(); ++i) {
            uint64_t key = pair_key(words[w][i], words[w][i + 1]);
            pair_counts[key] += word_counts[w];
            note_word(key, w);
        }

    struct Entry { int64_t count; uint64_t pair; };
    auto lower = [&](const Entry& a, const Entry& b) {  // heap order: count, then byte strings
        if (a.count != b.count) return a.count < b.count;
        const std::string &al = token_bytes[left_of(a.pair)], &bl = token_bytes[left_of(b.pair)];
        if (al != bl) return al < bl;
        return token_bytes[right_of(a.pair)] < token_bytes[right_of(b.pair)];
    };
    std::vector<Entry> heap;
    for (auto& [key, count] : pair_counts) heap.push_back({count, key});
    std::make_heap(heap.begin(), heap.end(), lower);

    std::vector<std::pair<Rank, Rank>> merges;
    std::vector<int> last_visit(words.size(), -1);
    std::unordered_set<uint64_t> new_pairs;
    while (int(merges.size()) < num_merges && !heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), lower);
        Entry top = heap.back();
        heap.pop_back();
        auto found = pair_counts.find(top.pair);
        int64_t current = found == pair_counts.end() ? 0 : found->second;
        if (current != top.count) {
            if (current > 0) {
                heap.push_back({current, top.pair});
                std::push_heap(heap.begin(), heap.end(), lower);
            }
            continue;
        }
        const Rank left = left_of(top.pair), right = right_of(top.pair);
        const Rank merged = Rank(token_bytes.size());
        const int merge_index = int(merges.size());
        merges.emplace_back(left, right);
        token_bytes.push_back(token_bytes[left] + token_bytes[right]);

        new_pairs.clear();
        std::vector<uint32_t> holders = std::move(pair_words[top.pair]);
        pair_words.erase(top.pair);
        for (uint32_t w : holders) {
            if (last_visit[w] == merge_index) continue;
            last_visit[w] = merge_index;
            std::vector<Rank>& word = words[w];
            const int64_t count = word_counts[w];
            bool holds = false;
            for (size_t i = 0; i + 1 < word.size() && !holds; ++i) holds = word[i] == left && word[i + 1] == right;
            if (!holds) continue;
            for (size_t i = 0; i + 1 < word.size(); ++i) pair_counts[pair_key(word[i], word[i + 1])] -= count;
            size_t out = 0;
            for (size_t i = 0; i < word.size(); ++out) {
                if (i + 1 < word.size() && word[i] == left && word[i + 1] == right) {
                    word[out] = merged;
                    i += 2;
                } else {
                    word[out] = word[i++];
                }
            }
            word.resize(out);
            for (size_t i = 0; i + 1 < word.size(); ++i) {
                uint64_t key = pair_key(word[i], word[i + 1]);
                pair_counts[key] += count;
                if (word[i] == merged || word[i + 1] == merged) {
                    new_pairs.insert(key);
                    note_word(key, w);
                }
            }
        }
        pair_counts.erase(top.pair);
        for (uint64_t key : new_pairs) {
            heap.push_back({pair_counts[key], key});
            std::push_heap(heap.begin(), heap.end(), lower);
        }
    }
    return merges;
}

}  // namespace nanoslm
