// Python bindings for the native core (module _nanoslm). Strings cross as UTF-8 without copying
// where possible; all native work runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "bpe.h"

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

std::vector<std::string_view> utf8_views(const py::list& texts) {
    std::vector<std::string_view> views;
    views.reserve(texts.size());
    for (py::handle t : texts) views.push_back(utf8_view(t));
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
    auto worker = [&] {
        for (size_t i; (i = next.fetch_add(1)) < texts.size();) enc.encode(texts[i], allowed_special, &results[i]);
    };
    num_threads = std::max(1, std::min<int>(num_threads, int(texts.size())));
    std::vector<std::thread> threads;
    for (int t = 1; t < num_threads; ++t) threads.emplace_back(worker);
    worker();
    for (auto& th : threads) th.join();
    return results;
}

template <class Token>
void gather_checked(py::array data, py::array_t<int64_t> offsets, int64_t block_size, py::array_t<int64_t> x,
                    py::array_t<int64_t> y) {
    auto data_buf = data.request();
    if (data_buf.ndim != 1 || data_buf.strides[0] != sizeof(Token))
        throw std::invalid_argument("data must be a contiguous 1-D token array");
    auto off = offsets.unchecked<1>();
    const int64_t batch_size = off.shape(0), n = data_buf.shape[0];
    for (int64_t b = 0; b < batch_size; ++b)
        if (off(b) < 0 || off(b) + block_size + 1 > n)
            throw std::out_of_range("offset " + std::to_string(off(b)) + " leaves no room for block_size + 1 = " +
                                    std::to_string(block_size + 1) + " tokens in " + std::to_string(n));
    auto check_out = [&](py::array_t<int64_t>& a, const char* name) {
        if (a.ndim() != 2 || a.shape(0) != batch_size || a.shape(1) != block_size ||
            !(a.flags() & py::array::c_style) || !a.writeable())
            throw std::invalid_argument(std::string(name) + " must be a writable C-contiguous (B, T) int64 array");
    };
    check_out(x, "x");
    check_out(y, "y");
    const Token* d = static_cast<const Token*>(data_buf.ptr);
    const int64_t* o = off.data(0);
    int64_t *xp = x.mutable_data(), *yp = y.mutable_data();
    py::gil_scoped_release release;
    gather_batch<Token>(d, o, batch_size, block_size, xp, yp);
}

}  // namespace

PYBIND11_MODULE(_nanoslm, m) {
    m.doc() = "nanoslm native core: GPT-2 pre-tokenizer, BPE encoder and trainer, batch gathering";

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
            std::vector<std::string_view> views = utf8_views(texts);
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
            std::vector<std::string_view> views = utf8_views(texts);
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
            for (std::string_view v : utf8_views(texts)) copies.emplace_back(v);
            py::gil_scoped_release release;
            t.add_texts(copies, resolve_threads(num_threads));
        }, py::arg("texts"), py::arg("num_threads"))
        .def("train", &BpeTrainer::train, py::arg("num_merges"), py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("num_unique_pieces", &BpeTrainer::num_unique_pieces);

    m.def("gather_batch", [](py::array data, py::array_t<int64_t> offsets, int64_t block_size,
                             py::array_t<int64_t> x, py::array_t<int64_t> y) {
        if (data.dtype().is(py::dtype::of<uint16_t>())) gather_checked<uint16_t>(data, offsets, block_size, x, y);
        else if (data.dtype().is(py::dtype::of<uint32_t>())) gather_checked<uint32_t>(data, offsets, block_size, x, y);
        else throw std::invalid_argument("data must be uint16 or uint32 tokens");
    }, py::arg("data"), py::arg("offsets"), py::arg("block_size"), py::arg("x"), py::arg("y"),
       "x[b] = data[offsets[b] : offsets[b] + T], y[b] = the same shifted by one.");
}
