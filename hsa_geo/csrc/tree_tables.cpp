// What a hierarchy's sweeps need from its parent pointers, in one linear
// pass on the CPU: depths, leaf counts, first and last leaves, and the
// family tables of the CPU kernel (hsa_geo.hierarchy.plan.FamilyTables).
//
// The Python build (hsa_geo/hierarchy/hierarchy.py and plan.py) does the
// same with a few dozen tensor operations and sorts, whose fixed cost is
// most of a batch's forest build on small graphs. Here the orders are
// counting sorts. Invalid pointers are only detected, not explained: the
// caller then runs the Python checks, whose messages name the node.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace {

enum Status : int64_t {
  kValid = 0,
  kOutOfRange = 1,  // parent < -1 or >= num_nodes
  kLeafParent = 2,  // a leaf (or the node itself) as a parent
  kNoChildren = 3,  // a cluster without children
  kCycle = 4,
};

// Stable counting sort of `order` by key[node] in [0, range).
void counting_sort(std::vector<int64_t>& order, const std::vector<int64_t>& key, int64_t range) {
  std::vector<int64_t> start(range + 1, 0);
  for (int64_t node : order) ++start[key[node] + 1];
  for (int64_t value = 0; value < range; ++value) start[value + 1] += start[value];
  std::vector<int64_t> sorted(order.size());
  for (int64_t node : order) sorted[start[key[node]]++] = node;
  order.swap(sorted);
}

at::Tensor long_tensor(const std::vector<int64_t>& values) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kLong);
  std::copy(values.begin(), values.end(), out.data_ptr<int64_t>());
  return out;
}

// Returns [status (code, node), depth, num_leaves_below, first_leaf,
// last_leaf, family_node, child_ptr, children, pair_ptr, level_ptr]; on an
// invalid tree only the status.
std::vector<at::Tensor> analyse_tree(const at::Tensor& parent_, int64_t num_leaves) {
  TORCH_CHECK(parent_.scalar_type() == at::kLong && parent_.dim() == 1 &&
                  parent_.device().is_cpu(),
              "analyse_tree: parent must be a one-dimensional int64 CPU tensor");
  const at::Tensor parent_tensor = parent_.contiguous();
  const int64_t* parent = parent_tensor.data_ptr<int64_t>();
  const int64_t num_nodes = parent_tensor.numel();
  TORCH_CHECK(num_leaves >= 1 && num_leaves <= num_nodes, "analyse_tree: bad num_leaves");
  auto invalid = [](Status code, int64_t node) {
    return std::vector<at::Tensor>{long_tensor({code, node})};
  };

  std::vector<int64_t> num_children(num_nodes, 0);
  for (int64_t node = 0; node < num_nodes; ++node) {
    const int64_t up = parent[node];
    if (up < -1 || up >= num_nodes) return invalid(kOutOfRange, node);
    if (up == node || (up >= 0 && up < num_leaves)) return invalid(kLeafParent, node);
    if (up >= 0) ++num_children[up];
  }
  for (int64_t node = num_leaves; node < num_nodes; ++node)
    if (num_children[node] == 0) return invalid(kNoChildren, node);

  // depths: walk up to a node of known depth, then assign on the way back;
  // meeting a node of the current walk is a cycle
  constexpr int64_t kUnknown = -1, kOnWalk = -2;
  std::vector<int64_t> depth(num_nodes, kUnknown), walk;
  int64_t max_depth = 0;
  for (int64_t node = 0; node < num_nodes; ++node) {
    int64_t current = node;
    while (current >= 0 && depth[current] == kUnknown) {
      depth[current] = kOnWalk;
      walk.push_back(current);
      current = parent[current];
    }
    if (current >= 0 && depth[current] == kOnWalk) return invalid(kCycle, current);
    int64_t below = current < 0 ? -1 : depth[current];
    while (!walk.empty()) {
      depth[walk.back()] = ++below;
      walk.pop_back();
    }
    max_depth = std::max(max_depth, below);
  }

  // deepest first: fold leaf counts and leaf ranges into the parents
  std::vector<int64_t> by_depth(num_nodes), reversed_depth(num_nodes);
  for (int64_t node = 0; node < num_nodes; ++node) {
    by_depth[node] = node;
    reversed_depth[node] = max_depth - depth[node];
  }
  counting_sort(by_depth, reversed_depth, max_depth + 1);
  std::vector<int64_t> count(num_nodes, 0), first(num_nodes, num_nodes), last(num_nodes, -1);
  for (int64_t leaf = 0; leaf < num_leaves; ++leaf) {
    count[leaf] = 1;
    first[leaf] = last[leaf] = leaf;
  }
  for (int64_t node : by_depth) {
    const int64_t up = parent[node];
    if (up < 0) continue;
    count[up] += count[node];
    first[up] = std::min(first[up], first[node]);
    last[up] = std::max(last[up], last[node]);
  }

  // families (every cluster) by (depth descending, size, first leaf):
  // three stable counting sorts, least significant key first
  std::vector<int64_t> family(num_nodes - num_leaves);
  int64_t largest = 0;
  for (int64_t node = num_leaves; node < num_nodes; ++node) {
    family[node - num_leaves] = node;
    largest = std::max(largest, num_children[node]);
  }
  counting_sort(family, first, num_leaves);
  counting_sort(family, num_children, largest + 1);
  counting_sort(family, reversed_depth, max_depth + 1);

  const int64_t num_families = static_cast<int64_t>(family.size());
  std::vector<int64_t> position(num_nodes, -1);  // of every family in that order
  std::vector<int64_t> child_ptr(num_families + 1, 0), pair_ptr(num_families + 1, 0);
  for (int64_t index = 0; index < num_families; ++index) {
    const int64_t size = num_children[family[index]];
    position[family[index]] = index;
    child_ptr[index + 1] = child_ptr[index] + size;
    pair_ptr[index + 1] = pair_ptr[index] + size * size;
  }
  // children in sibling order (by first leaf): place them, then sort each
  // family's few children
  std::vector<int64_t> children(child_ptr[num_families]), filled(child_ptr.begin(),
                                                                 child_ptr.end() - 1);
  for (int64_t node = 0; node < num_nodes; ++node)
    if (parent[node] >= 0) children[filled[position[parent[node]]]++] = node;
  auto by_first_leaf = [&](int64_t left, int64_t right) { return first[left] < first[right]; };
  for (int64_t index = 0; index < num_families; ++index) {
    int64_t* begin = children.data() + child_ptr[index];
    int64_t* end = children.data() + child_ptr[index + 1];
    if (end - begin > 16) {
      std::sort(begin, end, by_first_leaf);
      continue;
    }
    for (int64_t* item = begin + 1; item < end; ++item)  // insertion sort: few children
      for (int64_t* at = item; at > begin && by_first_leaf(at[0], at[-1]); --at)
        std::swap(at[0], at[-1]);
  }
  std::vector<int64_t> level_ptr{0};
  for (int64_t index = 0; index < num_families; ++index) {
    if (index > 0 && depth[family[index]] != depth[family[index - 1]])
      level_ptr.push_back(index);
  }
  if (num_families > 0) level_ptr.push_back(num_families);

  return {long_tensor({kValid, -1}), long_tensor(depth), long_tensor(count), long_tensor(first),
          long_tensor(last), long_tensor(family), long_tensor(child_ptr), long_tensor(children),
          long_tensor(pair_ptr), long_tensor(level_ptr)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hsa_geo_cpu, m) {
  m.def("analyse_tree(Tensor parent, int num_leaves) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hsa_geo_cpu, CPU, m) { m.impl("analyse_tree", &analyse_tree); }
