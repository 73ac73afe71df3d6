#include "kernels/rewrite.h"

#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/passes/subgraph_rewrite.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

namespace blip2 {

int RewriteOperator(torch::jit::Module& module, const std::string& method, const std::string& from, const std::string& to,
                    int arguments) {
  std::shared_ptr<torch::jit::Graph> graph = torch::jit::toGraphFunction(module.get_method(method).function()).graph();
  {
    // Inline() takes callees' optimized graphs, which are only inlined themselves while graph
    // optimisation is on (we run with it off; see executor.cc).
    torch::jit::GraphOptimizerEnabledGuard optimize(true);
    torch::jit::Inline(*graph);
  }
  std::string values;  // "%a0, %a1, ..."
  for (int i = 0; i < arguments; ++i) values += (i ? ", %a" : "%a") + std::to_string(i);
  auto pattern = [&](const std::string& op) {
    return "\ngraph(" + values + "):\n  %r = " + op + "(" + values + ")\n  return (%r)";
  };
  torch::jit::SubgraphRewriter rewriter;
  rewriter.RegisterRewritePattern(pattern(from), pattern(to));
  rewriter.runOnGraph(graph);
  // Nested blocks included (the text of the whole graph).
  const std::string text = graph->toString(false), call = to + "(";
  int rewritten = 0;
  for (size_t at = text.find(call); at != std::string::npos; at = text.find(call, at + 1)) ++rewritten;
  return rewritten;
}

}  // namespace blip2
