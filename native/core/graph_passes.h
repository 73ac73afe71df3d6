// Load-time rewrites of TorchScript graphs: runtime optimisations the exported model code does
// not know about (they depend on the device and the libtorch at hand).
#pragma once

#include <string>

#include "core/torch_includes.h"

namespace blip2 {

// For CPU float32 matrix-vector products (one-row decode steps, the LM head of a one-prompt
// prefill), oneDNN's inner product reads the weights at close to memory bandwidth where the BLAS
// libtorch links (OpenBLAS on Debian) runs at a third of it (2 EPYC cores: 768x3072 in 0.2 vs
// 0.7 ms, the 50272x768 LM head in 7 vs 20 ms). With several rows and an unpacked weight oneDNN
// is not faster inside the model (and 20x slower for the LM head, which it repacks per call), so
// those keep BLAS, and so do small weights (under 512x512), where the layout conversions cost more
// than they save; the choice is made per call.
// Inlines `method`'s graph (its own copy; other methods keep calling the shared submodule code)
// and rewrites every aten::linear in it. Returns how many; 0 when libtorch has no oneDNN.
int UseOneDnnLinears(torch::jit::Module& module, const std::string& method);

}  // namespace blip2
