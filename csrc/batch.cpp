// Batch gathering for training: copy B windows of T + 1 tokens out of the memory-mapped token file
// straight into the int64 x and y tensors (y is x shifted by one), with no intermediate arrays.
#include "bpe.h"

namespace nanoslm {

template <class Token>
void gather_batch(const Token* data, const int64_t* offsets, int64_t batch_size, int64_t block_size,
                  int64_t* x, int64_t* y) {
    for (int64_t b = 0; b < batch_size; ++b) {
        const Token* row = data + offsets[b];
        int64_t* x_row = x + b * block_size;
        int64_t* y_row = y + b * block_size;
        for (int64_t t = 0; t < block_size; ++t) {
            x_row[t] = row[t];
            y_row[t] = row[t + 1];
        }
    }
}

template void gather_batch<uint16_t>(const uint16_t*, const int64_t*, int64_t, int64_t, int64_t*, int64_t*);
template void gather_batch<uint32_t>(const uint32_t*, const int64_t*, int64_t, int64_t, int64_t*, int64_t*);

}  // namespace nanoslm
