// Python bindings for the native core (module _nanoslm). Strings cross as UTF-8 without copying
// where possible; all native work runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <thread>

#include "bpe.h"
#include "decode.h"

namespace py = pybind11;
using namespace nanoslm;

namespace {

// A view of a Python str's UTF-8 bytes; raises UnicodeEncodeError for lone surrogates.
std::string_view utf8_view(py::handle text) {
    if (!PyUnicode_Check(text.ptr())) throw py::type_error(std::string("expected str, got ") + Py_TYPE(text.ptr())->tp_name);
    Py_ssize_t size;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
    if (!data) throw py::error_already_set();
    return {data, size_t(size)};
}

// Views of the UTF-8 bytes of texts' strings. They stay valid as long as `held` (a tuple of the same strings)
// lives, even if another thread empties the list while this one encodes without the GIL.
std::vector<std::string_view> utf8_views(const py::list& texts, py::tuple* held) {
    *held = py::tuple(texts);
    std::vector<std::string_view> views;
    views.reserve(held->size());
    for (py::handle t : *held) views.push_back(utf8_view(t));
    return views;
}

// Building the result list is most of the cost of a call: a fresh Python int per id would take longer
// than encoding. Ids are small, so each distinct one is created once and shared (a reference count bump).
constexpr Rank kCachedInts = 1 << 18;
PyObject* id_object(Rank id) {
    static std::vector<PyObject*> cache(kCachedInts, nullptr);  // lives as long as the process; GIL held
    if (id >= kCachedInts) return PyLong_FromUnsignedLong(id);
    if (!cache[id]) cache[id] = PyLong_FromUnsignedLong(id);
    Py_INCREF(cache[id]);
    return cache[id];
}

py::list to_py_list(const std::vector<Rank>& ids) {
    PyObject* list = PyList_New(Py_ssize_t(ids.size()));
    if (!list) throw py::error_already_set();
    for (size_t i = 0; i < ids.size(); ++i) PyList_SET_ITEM(list, Py_ssize_t(i), id_object(ids[i]));
    return py::reinterpret_steal<py::list>(list);
}

int resolve_threads(int num_threads) {
    if (num_threads > 0) return num_threads;
    return std::max(1u, std::thread::hardware_concurrency());
}

// Encodes texts[i] into results[i] on num_threads threads, handing out texts one at a time.
std::vector<std::vector<Rank>> encode_many(const Encoder& enc, const std::vector<std::string_view>& texts,
                                           const std::vector<std::string>& allowed_special, int num_threads) {
    std::vector<std::vector<Rank>> results(texts.size());
    std::atomic<size_t> next{0};
    run_on_threads(std::max(1, std::min<int>(num_threads, int(texts.size()))), [&](int) {
        for (size_t i; (i = next.fetch_add(1)) < texts.size();) enc.encode(texts[i], allowed_special, &results[i]);
    });
    return results;
}

// offsets: converted to a contiguous int64 array if need be (an input); x and y: written in place, so they
// must be exactly what they are read as, never a converted copy.
using Offsets = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

template <class Token>
void gather_checked(py::array data, Offsets offsets, int64_t block_size, py::array x, py::array y) {
    auto data_buf = data.request();
    if (data_buf.ndim != 1 || data_buf.strides[0] != sizeof(Token))
        throw std::invalid_argument("data must be a contiguous 1-D token array");
    if (offsets.ndim() != 1) throw std::invalid_argument("offsets must be a 1-D array");
    if (block_size < 1) throw std::invalid_argument("block_size must be positive");
    const int64_t batch_size = offsets.shape(0), n = data_buf.shape[0];
    const int64_t* o = offsets.data();
    for (int64_t b = 0; b < batch_size; ++b)
        if (o[b] < 0 || o[b] > n - block_size - 1)  // not o[b] + block_size + 1 > n, which can overflow
            throw std::out_of_range("offset " + std::to_string(o[b]) + " leaves no room for block_size " +
                                    std::to_string(block_size) + " + 1 tokens in " + std::to_string(n));
    auto check_out = [&](py::array& a, const char* name) {
        if (!a.dtype().is(py::dtype::of<int64_t>()) || a.ndim() != 2 || a.shape(0) != batch_size ||
            a.shape(1) != block_size || !(a.flags() & py::array::c_style) || !a.writeable())
            throw std::invalid_argument(std::string(name) + " must be a writable C-contiguous (B, T) int64 array");
    };
    check_out(x, "x");
    check_out(y, "y");
    const Token* d = static_cast<const Token*>(data_buf.ptr);
    int64_t *xp = static_cast<int64_t*>(x.mutable_data()), *yp = static_cast<int64_t*>(y.mutable_data());
    py::gil_scoped_release release;
    gather_batch<Token>(d, o, batch_size, block_size, xp, yp);
}


// The model's decoding step (decode.h) over its own tensors, passed as NumPy views (tensor.numpy(): no copy).
// The arrays are kept referenced here, so the memory the pointers address lives as long as the Decoder.
class PyDecoder {
  public:
    PyDecoder(const py::dict& config, const py::dict& weights, const py::list& layers, int n_threads,
              const std::string& isa)
        // more threads than the machine runs at once would leave spinning threads waiting on descheduled ones
        : n_threads_(std::clamp(n_threads, 1, std::max(1, int(std::thread::hardware_concurrency())))),
          isa_(resolve_instruction_set(isa)) {
        auto required = [&](const char* key) -> py::object {
            if (!config.contains(key)) throw std::invalid_argument(std::string("the decoder's config has no ") + key);
            return config[key];
        };
        auto get = [&](const char* key) { return required(key).cast<int>(); };
        auto flag = [&](const char* key) { return required(key).cast<bool>(); };
        c_ = DecoderConfig{get("n_layer"), get("n_head"), get("n_embd"), get("hidden"), get("vocab_size"),
                           get("block_size"), get("batch_size"), flag("rmsnorm"), flag("swiglu"), flag("rope"),
                           required("eps").cast<float>(), config.contains("relu2") && flag("relu2"),
                           config.contains("qk_norm") && flag("qk_norm"),
                           config.contains("group") ? get("group") : 0};
        if (c_.group != 0 && c_.group != 32 && c_.group != 64)
            throw std::invalid_argument("group must be 0 (fp32 weights), 32 or 64 (int8 weights), not " +
                                        std::to_string(c_.group));
        if (c_.swiglu && c_.relu2) throw std::invalid_argument("the MLP is swiglu or relu2, not both");
        if (c_.n_layer < 0 || c_.n_head < 1 || c_.n_embd < 1 || c_.n_embd % c_.n_head || c_.hidden < 1 ||
            c_.vocab_size < 1 || c_.block_size < 1 || c_.batch_size < 1)
            throw std::invalid_argument("the decoder's config has a size that is not positive, or n_embd is not a "
                                        "multiple of n_head");
        // The step indexes with int: every product of sizes it forms must fit one (2 * hidden for swiglu's fc rows,
        // 3 * n_embd * n_embd, vocab_size * n_embd, batch_size * block_size * n_embd for a cache, ...). The sizes
        // are positive ints, so a product checked factor by factor never leaves int64 on the way.
        auto fits_int = [](std::initializer_list<int64_t> factors) {
            int64_t product = 1;
            for (int64_t f : factors)
                if ((product *= f) > std::numeric_limits<int>::max()) return false;
            return true;
        };
        const int64_t widest_out = std::max({3 * int64_t(c_.n_embd), 2 * int64_t(c_.hidden), int64_t(c_.vocab_size)});
        if (!fits_int({c_.swiglu ? 2 : 1, c_.hidden, c_.n_embd}) || !fits_int({3, c_.n_embd, c_.n_embd}) ||
            !fits_int({c_.vocab_size, c_.n_embd}) || !fits_int({c_.batch_size, c_.block_size, c_.n_embd}) ||
            !fits_int({c_.batch_size, widest_out}))
            throw std::invalid_argument("the decoder's config is too large: a product of its sizes does not fit a "
                                        "32-bit index");
        if (c_.rope && (c_.n_embd / c_.n_head) % 2)
            throw std::invalid_argument("rotary positions need an even head size");
        const int C = c_.n_embd, V = c_.vocab_size, H = c_.hidden, T = c_.block_size, hs = C / c_.n_head;
        if (c_.n_layer != int(layers.size())) throw std::invalid_argument("n_layer does not match the layers given");
        w_.wte = matrix(weights, "wte", V, C);
        w_.wpe = c_.rope ? nullptr : input(weights, "wpe", {T, C});
        w_.rope_cos = c_.rope ? input(weights, "rope_cos", {T, hs / 2}) : nullptr;
        w_.rope_sin = c_.rope ? input(weights, "rope_sin", {T, hs / 2}) : nullptr;
        w_.ln_f_weight = input(weights, "ln_f_weight", {C});
        w_.ln_f_bias = input(weights, "ln_f_bias", {C}, true);
        w_.lm_head = matrix(weights, "lm_head", V, C);
        const int fc_rows = c_.swiglu ? 2 * H : H;
        for (py::handle layer : layers) {
            py::dict d = layer.cast<py::dict>();
            DecoderLayer L;
            L.ln_1_weight = input(d, "ln_1_weight", {C});
            L.ln_1_bias = input(d, "ln_1_bias", {C}, true);
            L.attn_weight = matrix(d, "attn_weight", 3 * C, C);
            L.attn_bias = input(d, "attn_bias", {3 * C}, true);
            L.q_norm = c_.qk_norm ? input(d, "q_norm", {hs}) : nullptr;
            L.k_norm = c_.qk_norm ? input(d, "k_norm", {hs}) : nullptr;
            L.attn_proj_weight = matrix(d, "attn_proj_weight", C, C);
            L.attn_proj_bias = input(d, "attn_proj_bias", {C}, true);
            L.ln_2_weight = input(d, "ln_2_weight", {C});
            L.ln_2_bias = input(d, "ln_2_bias", {C}, true);
            L.fc_weight = matrix(d, "fc_weight", fc_rows, C);
            L.fc_bias = input(d, "fc_bias", {fc_rows}, true);
            L.mlp_proj_weight = matrix(d, "mlp_proj_weight", C, H);
            L.mlp_proj_bias = input(d, "mlp_proj_bias", {C}, true);
            L.k_cache = const_cast<float*>(input(d, "k_cache", {c_.batch_size, c_.n_head, T, hs}, false, true));
            L.v_cache = const_cast<float*>(input(d, "v_cache", {c_.batch_size, c_.n_head, T, hs}, false, true));
            w_.layers.push_back(L);
        }
    }

    void step(py::array_t<int64_t, py::array::c_style> tokens, int pos, py::array logits) {
        if (tokens.ndim() != 1 || tokens.shape(0) != c_.batch_size)
            throw std::invalid_argument("tokens must be (batch_size,) int64");
        for (py::ssize_t b = 0; b < tokens.shape(0); ++b)
            if (tokens.at(b) < 0 || tokens.at(b) >= c_.vocab_size)
                throw std::out_of_range("token id " + std::to_string(tokens.at(b)) + " is outside the vocabulary");
        if (pos < 0 || pos >= c_.block_size) throw std::out_of_range("pos must lie in [0, block_size)");
        float* out = const_cast<float*>(check(logits, "logits", {c_.batch_size, c_.vocab_size}, true));
        const int64_t* t = tokens.data();
        py::gil_scoped_release release;
        decode_step(c_, w_, t, pos, out, n_threads_, isa_);
    }

  private:
    const float* check(const py::array& a, const std::string& name, std::vector<py::ssize_t> shape, bool writable) {
        if (!a.dtype().is(py::dtype::of<float>()) || !(a.flags() & py::array::c_style) ||
            a.ndim() != py::ssize_t(shape.size()) || !std::equal(shape.begin(), shape.end(), a.shape()) ||
            (writable && !a.writeable()))
            throw std::invalid_argument(name + " must be a C-contiguous float32 array of the model's shape");
        return static_cast<const float*>(a.data());
    }
    const float* input(const py::dict& d, const char* key, std::vector<py::ssize_t> shape, bool optional = false,
                       bool writable = false) {
        if (!d.contains(key) || d[key].is_none()) {
            if (optional) return nullptr;
            throw std::invalid_argument(std::string("missing ") + key);
        }
        py::array a = d[key].cast<py::array>();
        keep_.push_back(a);
        return check(a, key, std::move(shape), writable);
    }

    // A weight matrix (n_out, n_in): key itself (fp32), or with int8 weights key_q (int8, that shape) and
    // key_scales (float32, (n_out, ceil(n_in / group))).
    Matrix matrix(const py::dict& d, const std::string& key, int n_out, int n_in) {
        Matrix m;
        if (!c_.group) {
            m.w = input(d, key.c_str(), {n_out, n_in});
            return m;
        }
        const std::string q = key + "_q", scales = key + "_scales";
        if (!d.contains(q.c_str()) || d[q.c_str()].is_none()) throw std::invalid_argument("missing " + q);
        py::array a = d[q.c_str()].cast<py::array>();
        if (!a.dtype().is(py::dtype::of<int8_t>()) || !(a.flags() & py::array::c_style) || a.ndim() != 2 ||
            a.shape(0) != n_out || a.shape(1) != n_in)
            throw std::invalid_argument(q + " must be a C-contiguous int8 array of the model's shape");
        keep_.push_back(a);
        m.q = static_cast<const int8_t*>(a.data());
        m.scales = input(d, scales.c_str(), {n_out, (n_in + c_.group - 1) / c_.group});
        return m;
    }

    DecoderConfig c_;
    DecoderWeights w_;
    int n_threads_;
    std::string isa_;
    std::vector<py::array> keep_;
};

}  // namespace

PYBIND11_MODULE(_nanoslm, m) {
    m.doc() = "nanoslm native core: GPT-2 pre-tokenizer, BPE encoder and trainer, batch gathering, decoding";

    m.def("pretokenize", [](py::handle text) {
        std::string_view s = utf8_view(text);
        py::list pieces;
        pretokenize(s, [&](std::string_view p) { pieces.append(py::str(p.data(), p.size())); });
        return pieces;
    }, py::arg("text"), "Split text into pieces with the GPT-2 pattern.");
    m.def("char_class", [](uint32_t codepoint) { return int(char_class(codepoint)); }, py::arg("codepoint"),
          "0 other, 1 letter (\\p{L}), 2 number (\\p{N}), 3 whitespace (\\s).");
    m.def("valid_utf8_prefix", [](py::bytes b) { return valid_utf8_prefix(std::string_view(b)); }, py::arg("data"));

    py::class_<Encoder>(m, "Encoder")
        .def(py::init([](const std::vector<py::bytes>& tokens, std::vector<std::pair<std::string, Rank>> specials) {
                 std::vector<std::string> token_bytes;
                 token_bytes.reserve(tokens.size());
                 for (const auto& t : tokens) token_bytes.emplace_back(std::string(t));
                 return new Encoder(std::move(token_bytes), std::move(specials));
             }),
             py::arg("token_bytes"), py::arg("special_tokens"))
        .def_property_readonly("n_vocab", &Encoder::n_vocab)
        .def("encode_ordinary", [](const Encoder& enc, py::handle text) {
            std::string_view s = utf8_view(text);
            std::vector<Rank> ids;
            {
                py::gil_scoped_release release;
                enc.encode_ordinary(s, &ids);
            }
            return to_py_list(ids);
        }, py::arg("text"))
        .def("encode", [](const Encoder& enc, py::handle text, const std::vector<std::string>& allowed) {
            std::string_view s = utf8_view(text);
            std::vector<Rank> ids;
            {
                py::gil_scoped_release release;
                enc.encode(s, allowed, &ids);
            }
            return to_py_list(ids);
        }, py::arg("text"), py::arg("allowed_special"))
        .def("encode_batch", [](const Encoder& enc, const py::list& texts, const std::vector<std::string>& allowed,
                                int num_threads) {
            py::tuple held;
            std::vector<std::string_view> views = utf8_views(texts, &held);
            std::vector<std::vector<Rank>> results;
            {
                py::gil_scoped_release release;
                results = encode_many(enc, views, allowed, resolve_threads(num_threads));
            }
            py::list out(results.size());
            for (size_t i = 0; i < results.size(); ++i) out[i] = to_py_list(results[i]);
            return out;
        }, py::arg("texts"), py::arg("allowed_special"), py::arg("num_threads"))
        .def("encode_to_array", [](const Encoder& enc, const py::list& texts, const std::vector<std::string>& allowed,
                                   int num_threads, int64_t append_id) {
            // All texts' ids concatenated into one uint32 array, append_id (if >= 0) after each text.
            if (append_id >= int64_t(enc.n_vocab()))  // not a token: a uint32 would also wrap it silently
                throw std::invalid_argument("append_id " + std::to_string(append_id) +
                                            " is not in the vocabulary (n_vocab " + std::to_string(enc.n_vocab()) +
                                            "); pass -1 to append nothing");
            py::tuple held;
            std::vector<std::string_view> views = utf8_views(texts, &held);
            std::vector<std::vector<Rank>> results;
            {
                py::gil_scoped_release release;
                results = encode_many(enc, views, allowed, resolve_threads(num_threads));
            }
            size_t total = 0;
            for (auto& r : results) total += r.size() + (append_id >= 0);
            py::array_t<uint32_t> out(total);
            uint32_t* p = out.mutable_data();
            for (auto& r : results) {
                p = std::copy(r.begin(), r.end(), p);
                if (append_id >= 0) *p++ = uint32_t(append_id);
            }
            return out;
        }, py::arg("texts"), py::arg("allowed_special"), py::arg("num_threads"), py::arg("append_id"))
        .def("decode_bytes", [](const Encoder& enc, const std::vector<Rank>& ids) {
            std::string bytes;
            {
                py::gil_scoped_release release;
                bytes = enc.decode_bytes(ids);
            }
            return py::bytes(bytes);
        }, py::arg("ids"));

    py::class_<BpeTrainer>(m, "BpeTrainer")
        .def(py::init<std::vector<std::string>>(), py::arg("special_tokens"))
        .def("add_texts", [](BpeTrainer& t, const py::list& texts, int num_threads) {
            std::vector<std::string> copies;
            copies.reserve(texts.size());
            py::tuple held;
            for (std::string_view v : utf8_views(texts, &held)) copies.emplace_back(v);
            py::gil_scoped_release release;
            t.add_texts(copies, resolve_threads(num_threads));
        }, py::arg("texts"), py::arg("num_threads"))
        .def("train", &BpeTrainer::train, py::arg("num_merges"), py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("num_unique_pieces", &BpeTrainer::num_unique_pieces);

    m.def("gather_batch", [](py::array data, Offsets offsets, int64_t block_size, py::array x, py::array y) {
        if (data.dtype().is(py::dtype::of<uint16_t>())) gather_checked<uint16_t>(data, offsets, block_size, x, y);
        else if (data.dtype().is(py::dtype::of<uint32_t>())) gather_checked<uint32_t>(data, offsets, block_size, x, y);
        else throw std::invalid_argument("data must be uint16 or uint32 tokens");
    }, py::arg("data"), py::arg("offsets"), py::arg("block_size"), py::arg("x"), py::arg("y"),
       "x[b] = data[offsets[b] : offsets[b] + T], y[b] = the same shifted by one.");
    py::class_<PyDecoder>(m, "Decoder")
        .def(py::init<const py::dict&, const py::dict&, const py::list&, int, const std::string&>(),
             py::arg("config"), py::arg("weights"), py::arg("layers"), py::arg("n_threads"), py::arg("isa") = "")
        .def("step", &PyDecoder::step, py::arg("tokens"), py::arg("pos"), py::arg("logits"),
             "Write the logits (B, V) of the tokens (B,) at position pos; their keys and values go into the caches.");
    m.def("decode_instruction_sets", &decode_instruction_sets,
          "The instruction sets the decoder's vector kernels are built for that this CPU runs, widest first.");
    m.def("weight_block", [](py::ssize_t n_floats) {
        if (n_floats < 0) throw std::invalid_argument("n_floats must not be negative");
        auto* block = new WeightBlock(size_t(n_floats));
        py::capsule owner(block, [](void* p) { delete static_cast<WeightBlock*>(p); });
        return py::array_t<float>({n_floats}, {py::ssize_t(sizeof(float))}, block->data(), owner);
    }, py::arg("n_floats"), "A float32 array of n_floats, uninitialised, in memory aligned to 2 MB and backed by "
       "huge pages where the system allows (decode.h: WeightBlock).");
}
