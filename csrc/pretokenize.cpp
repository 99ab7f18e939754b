// The GPT-2 pre-tokenizer as a hand-written scanner (no regex engine): at each position it tries the
// pattern's alternatives in order, exactly as a leftmost-first regex engine would.
#include <vector>

#include "bpe.h"

namespace nanoslm {

namespace {
// One byte per code point: 1.1 MB, built once from the generated ranges.
std::vector<CharClass> build_class_table() {
    std::vector<CharClass> table(0x110000, kOther);
    for (const CodepointRange& r : kCodepointRanges)
        for (uint32_t c = r.first; c <= r.last; ++c) table[c] = r.cls;
    return table;
}
const std::vector<CharClass>& class_table() {
    static const std::vector<CharClass> table = build_class_table();
    return table;
}
}  // namespace

CharClass char_class(uint32_t codepoint) {
    return codepoint < 0x110000 ? class_table()[codepoint] : kOther;
}

size_t next_piece_end(std::string_view text, size_t pos) {
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    const size_t n = text.size();
    const CharClass* table = class_table().data();
    size_t len;
    uint32_t cp = decode_utf8(s + pos, &len);

    // 's 't 'm 'd 'll 've 're
    if (cp == '\'' && pos + 1 < n) {
        unsigned char a = s[pos + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return pos + 2;
        if (pos + 2 < n) {
            unsigned char b = s[pos + 2];
            if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return pos + 3;
        }
    }

    // " ?\p{L}+", " ?\p{N}+" and " ?[^\s\p{L}\p{N}]+": an optional space, then a run of one class.
    size_t run_start = pos;
    CharClass cls = table[cp];
    if (cp == ' ' && pos + 1 < n) {
        size_t next_len;
        CharClass next_cls = table[decode_utf8(s + pos + 1, &next_len)];
        if (next_cls != kSpace) {
            run_start = pos + 1;
            cls = next_cls;
        }
    }
    if (cls != kSpace) {
        size_t end = run_start;
        while (end < n) {
            uint32_t c = decode_utf8(s + end, &len);
            if (table[c] != cls) break;
            end += len;
        }
        return end;
    }

    // "\s+(?!\S)" then "\s+": a whitespace run, less its last character when a non-space follows
    // (that character then starts the next piece, e.g. the space of " word").
    size_t end = pos, last_start = pos;
    while (end < n) {
        uint32_t c = decode_utf8(s + end, &len);
        if (table[c] != kSpace) break;
        last_start = end;
        end += len;
    }
    if (end < n && last_start > pos) return last_start;
    return end;
}

size_t valid_utf8_prefix(std::string_view text) {
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    const size_t n = text.size();
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t min_cp;
        if (c < 0x80) { ++i; continue; }
        else if ((c & 0xE0) == 0xC0) { len = 2; min_cp = 0x80; }
        else if ((c & 0xF0) == 0xE0) { len = 3; min_cp = 0x800; }
        else if ((c & 0xF8) == 0xF0) { len = 4; min_cp = 0x10000; }
        else return i;
        if (i + len > n) return i;
        for (size_t k = 1; k < len; ++k)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        size_t ignored;
        uint32_t cp = decode_utf8(s + i, &ignored);
        if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += len;
    }
    return n;
}

}  // namespace nanoslm
