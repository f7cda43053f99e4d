// Issues the work of one layer call as a replay of a cached CUDA graph. A stream launch makes
// each kernel wait for the one before it to drain and then be launched; in a graph the GPU has
// the whole chain at once and starts each kernel sooner (measured in docs/design.md, "Graph
// replay").
#pragma once

#include <omnimoe/omnimoe.h>

#include <functional>
#include <string>

namespace omnimoe::detail {

// Runs issue(e), where e is exec on another stream: on CUDA the work is captured on a library
// stream into a graph, which updates the executable graph cached under (device, exec.stream,
// `key`) (instantiated on first use, or again when the capture's topology changed), and that is
// launched on exec.stream. Calls issue(exec) itself
// on the CPU, when exec.graph_replay is false or OMNIMOE_GRAPH_REPLAY=off, and when exec.stream
// is being captured (the caller's graph then takes the kernels). `key` only picks the cached
// graph: two calls with different keys never share one, calls with the same key share it, and a
// key that does not fit the work costs an instantiation, never a wrong result.
void issue_as_graph(const Exec& exec, const std::string& key,
                    const std::function<void(const Exec&)>& issue);

}  // namespace omnimoe::detail
