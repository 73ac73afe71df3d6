// Load-time rewrites of an exported graph to blip2's operators (blip2::linear, blip2::matmul).
#pragma once

#include <string>

#include "core/torch_includes.h"

namespace blip2 {

// Rewrites every call of `from` (e.g. "aten::linear") in `method`'s graph, inlined first, to `to`
// ("blip2::linear"), an operator with the same schema. Returns how many calls `to` has after.
int RewriteOperator(torch::jit::Module& module, const std::string& method, const std::string& from, const std::string& to,
                    int arguments);

}  // namespace blip2
