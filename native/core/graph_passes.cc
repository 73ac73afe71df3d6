#include "core/graph_passes.h"

#include "core/stats.h"

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/passes/subgraph_rewrite.h>
#include <torch/jit.h>

namespace blip2 {

int UseOneDnnLinears(torch::jit::Module& module, const std::string& method) {
  if (!at::hasMKLDNN()) return 0;
  // The replacement is compiled by this libtorch, so its ops carry this libtorch's schemas
  // (aten::to_dense grew a keyword argument between 1.13 and 2.x); once per process.
  static const std::string replacement = [] {
    auto unit = torch::jit::compile(R"JIT(
def linear(x: Tensor, w: Tensor, b: Optional[Tensor]):
    if x.numel() == x.size(-1) and w.numel() >= 262144:
        return torch.mkldnn_linear(x.to_mkldnn(), w, b).to_dense()
    return torch.linear(x, w, b)
)JIT");
    return torch::jit::toGraphFunction(unit->get_function("linear")).graph()->toString(false);
  }();
  std::shared_ptr<torch::jit::Graph> graph = torch::jit::toGraphFunction(module.get_method(method).function()).graph();
  {
    // Inline() takes callees' optimized graphs, which are only inlined themselves while graph
    // optimisation is on (we run with it off; see executor.cc).
    torch::jit::GraphOptimizerEnabledGuard optimize(true);
    torch::jit::Inline(*graph);
  }
  torch::jit::SubgraphRewriter rewriter;
  rewriter.RegisterRewritePattern(R"IR(
graph(%x, %w, %b):
  %r = aten::linear(%x, %w, %b)
  return (%r))IR",
                                  replacement);
  rewriter.runOnGraph(graph);
  std::string text = graph->toString(false);
  int rewritten = 0;
  for (size_t at = text.find("aten::mkldnn_linear("); at != std::string::npos; at = text.find("aten::mkldnn_linear(", at + 1)) {
    ++rewritten;
  }
  Stats::onednn_linears += rewritten;
  return rewritten;
}

}  // namespace blip2
