// The exact HSA sweeps as plain loops over families, for the CPU.
//
// The tensor sweeps (hsa_geo/functional/sweep.py) spend their time on many
// small tensor operations over padded blocks; on batches of small graphs
// (families of 2-6 children) that is per-operation overhead and memory
// traffic, not arithmetic. Here every family is one pass over its b x b
// sibling pairs, per head, with the same formulas and names
// (docs/derivation.rst, "Forward pass" and "Backward pass"):
//
//   scores  S[i][j] = scale mq(B_i).mk(B_j) + log|B_j| (+ key term, + bias),
//           S[i][i] = -phi(B_i), -inf for a later sibling when causal;
//   weight  W[i][j] = exp(S[i][j] - log Z_i), log Z_i = logsumexp_j S[i][j];
//   phi(A)  = -sum_i |B_i|/|A| log Z_i;
//   top-down: y_i = u_A + P(A) sum_j W[i][j] mv(B_j); a leaf outputs y_i,
//           a cluster passes u = y_i - P(A) W[i][i] mv(B_i) and
//           log P(B_i) = log P(A) + log W[i][i] down.
//
// Families of one level are independent and run in parallel. The tree comes
// as tables built once per hierarchy (hsa_geo.hierarchy.plan.FamilyTables):
// families in bottom-up level order, their children in sibling order, the
// b x b pairs of every family row-major (the order of a pair bias).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace {

struct Tree {
  const int64_t* family_node;  // [F] the cluster node of every family
  const int64_t* child_ptr;    // [F + 1] children of family f: child_ptr[f] .. child_ptr[f + 1]
  const int64_t* children;     // node ids, sibling order
  const int64_t* pair_ptr;     // [F + 1] first of the family's b * b pairs (row-major)
  const int64_t* level_ptr;    // [L + 1] families of every level, deepest level first
  int64_t num_families;
  int64_t num_levels;
  int64_t num_leaves;
  int64_t num_nodes;
  int64_t num_pairs;  // sum of b * b

  Tree(const at::Tensor& family_node_, const at::Tensor& child_ptr_, const at::Tensor& children_,
       const at::Tensor& pair_ptr_, const at::Tensor& level_ptr_, int64_t num_leaves_,
       int64_t num_nodes_)
      : family_node(family_node_.data_ptr<int64_t>()),
        child_ptr(child_ptr_.data_ptr<int64_t>()),
        children(children_.data_ptr<int64_t>()),
        pair_ptr(pair_ptr_.data_ptr<int64_t>()),
        level_ptr(level_ptr_.data_ptr<int64_t>()),
        num_families(family_node_.numel()),
        num_levels(level_ptr_.numel() - 1),
        num_leaves(num_leaves_),
        num_nodes(num_nodes_),
        num_pairs(pair_ptr_.data_ptr<int64_t>()[family_node_.numel()]) {}

  const int64_t* children_of(int64_t family) const { return children + child_ptr[family]; }
  int64_t num_children(int64_t family) const {
    return child_ptr[family + 1] - child_ptr[family];
  }

};

void check_tables(const at::Tensor& family_node, const at::Tensor& child_ptr,
                  const at::Tensor& children, const at::Tensor& pair_ptr,
                  const at::Tensor& level_ptr) {
  for (const at::Tensor* table : {&family_node, &child_ptr, &children, &pair_ptr, &level_ptr}) {
    TORCH_CHECK(table->scalar_type() == at::kLong && table->is_contiguous() &&
                    table->device().is_cpu(),
                "hsa_sweeps: tree tables must be contiguous int64 CPU tensors");
  }
  TORCH_CHECK(child_ptr.numel() == family_node.numel() + 1 &&
                  pair_ptr.numel() == family_node.numel() + 1 && level_ptr.numel() >= 1,
              "hsa_sweeps: inconsistent tree tables");
}

// leaf counts |X| of every node (leaves 1), bottom-up
std::vector<double> leaf_counts(const Tree& tree) {
  std::vector<double> count(tree.num_nodes, 0.0);
  for (int64_t node = 0; node < tree.num_leaves; ++node) count[node] = 1.0;
  for (int64_t family = 0; family < tree.num_families; ++family) {
    double total = 0.0;
    for (int64_t c = tree.child_ptr[family]; c < tree.child_ptr[family + 1]; ++c)
      total += count[tree.children[c]];
    count[tree.family_node[family]] = total;
  }
  return count;
}

// whether every node is some family's child (roots and isolated leaves are not)
std::vector<char> has_parent(const Tree& tree) {
  std::vector<char> out(tree.num_nodes, 0);
  const int64_t num_children = tree.child_ptr[tree.num_families];
  for (int64_t c = 0; c < num_children; ++c) out[tree.children[c]] = 1;
  return out;
}

// Every large buffer of a call is fresh memory from the system (the
// allocator maps it, and unmaps it when freed), and the first write to each
// of its 4 KiB pages costs a page fault: at 2^20 leaves about 1.3 GB per
// forward and backward, a third of the call's time, and a share that grows
// with N (small buffers are reused from the heap). Asking for transparent
// huge pages where the system grants them on request (Linux's "madvise"
// mode; a no-op elsewhere) makes that one fault per 2 MiB. Called before
// the buffer is first written.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t huge_page = size_t(2) << 20;
  if (data == nullptr || bytes < 2 * huge_page) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t address = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (address + page - 1) / page * page;
  const uintptr_t end = (address + bytes) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// A tensor left uninitialised (see advise_huge_pages)
at::Tensor fresh(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor tensor = at::empty(sizes, options);
  advise_huge_pages(tensor.data_ptr(), tensor.nbytes());
  return tensor;
}

// A buffer left uninitialised: every entry is written before it is read
// (a root's rows, which no family writes, are zeroed by the caller), which
// spares a pass over memory per buffer and call at large N.
template <typename scalar_t>
std::unique_ptr<scalar_t[]> uninitialised(int64_t size) {
  std::unique_ptr<scalar_t[]> buffer(new scalar_t[size]);
  advise_huge_pages(buffer.get(), size * sizeof(scalar_t));
  return buffer;
}

// Zeroes the `width` numbers per head of every root cluster in a
// [clusters, heads, width] buffer.
template <typename scalar_t>
void zero_roots(scalar_t* buffer, const std::vector<char>& parented, int64_t num_leaves,
                int64_t heads, int64_t width) {
  for (int64_t node = num_leaves; node < static_cast<int64_t>(parented.size()); ++node)
    if (!parented[node])
      std::fill_n(buffer + (node - num_leaves) * heads * width, heads * width, scalar_t(0));
}

// Copies (or zeroes, with source null) the rows of the isolated leaves.
template <typename scalar_t>
void isolated_rows(scalar_t* target, const scalar_t* source, const std::vector<char>& parented,
                   int64_t num_leaves, int64_t row) {
  for (int64_t leaf = 0; leaf < num_leaves; ++leaf) {
    if (parented[leaf]) continue;
    if (source == nullptr)
      std::fill_n(target + leaf * row, row, scalar_t(0));
    else
      std::copy_n(source + leaf * row, row, target + leaf * row);
  }
}

template <typename scalar_t>
std::vector<scalar_t> logarithms(const std::vector<double>& values) {
  std::vector<scalar_t> out(values.size());
  for (size_t index = 0; index < values.size(); ++index)
    out[index] = static_cast<scalar_t>(std::log(values[index]));
  return out;
}

// exp in float32 without a library call, so that a loop of them
// vectorises (built with -fno-trapping-math, which lets the compiler turn
// the comparisons into selects): Cephes' range reduction x = n log 2 + r,
// |r| <= log 2 / 2, and its degree-6 polynomial for e^r, within about one
// ulp of std::exp; e^x = 0 below -87.3 (and for -inf, a later sibling
// under the causal mask); NaN stays NaN. Double keeps std::exp.
template <typename scalar_t>
inline scalar_t exponential(scalar_t x) {
  return std::exp(x);
}

template <>
inline float exponential<float>(float x) {
  const float clamped = std::min(std::max(x, -87.3f), 88.3f);
  // rounds to the nearest integer by the float's own rounding: adding
  // 1.5 * 2^23 leaves it in the low bits of the mantissa
  constexpr float shifter = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float mantissa = p * r * r + r + 1.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const int32_t power_bits = (shifted_bits - 0x4B400000 + 127) * (1 << 23);  // 2^n
  float power;
  std::memcpy(&power, &power_bits, sizeof(power));
  return x < -87.3f ? 0.0f : mantissa * power;
}

// Row operations in chunks of eight features: the partial sums of a chunk
// are independent, so the compiler vectorises them and keeps them in
// registers (one running sum would wait on every addition, and a
// floating-point sum may not be reordered for it).
constexpr int64_t kChunk = 8;

// Rows of a width known to the compiler (Width > 0, four times a power of
// two: the kernel specialises 8, 16, 32 and 64) in float32 are handled as
// 4-lane vectors (GCC's vector extension: SSE on
// x86-64, NEON on ARM): a dot product's partial sums are added as a tree of
// vectors, and a weighted sum of rows keeps its whole output row in
// registers while it walks the rows. Other widths and double use the
// chunked loops.
typedef float float4 __attribute__((vector_size(16)));

inline float4 load4(const float* data) {
  float4 out;
  std::memcpy(&out, data, sizeof(out));
  return out;
}

inline void store4(float* data, float4 value) { std::memcpy(data, &value, sizeof(value)); }

template <typename scalar_t, int64_t Width>
constexpr bool vector_rows() {
  // the dot product's tree of vector sums halves a power of two
  return std::is_same<scalar_t, float>::value && Width > 0 && Width % 4 == 0 &&
         ((Width / 4) & (Width / 4 - 1)) == 0;
}

template <int64_t Width, typename scalar_t>
inline scalar_t dot(const scalar_t* left, const scalar_t* right, int64_t size) {
  if constexpr (vector_rows<scalar_t, Width>()) {
    constexpr int64_t lanes = Width / 4;
    float4 partial[lanes];
    for (int64_t c = 0; c < lanes; ++c) partial[c] = load4(left + 4 * c) * load4(right + 4 * c);
    for (int64_t half = lanes / 2; half >= 1; half /= 2)
      for (int64_t c = 0; c < half; ++c) partial[c] += partial[c + half];
    const float4 sum = partial[0];
    return (sum[0] + sum[2]) + (sum[1] + sum[3]);
  } else {
    scalar_t partial[kChunk] = {};
    int64_t d = 0;
    for (; d + kChunk <= size; d += kChunk)
      for (int64_t c = 0; c < kChunk; ++c) partial[c] += left[d + c] * right[d + c];
    scalar_t total = 0;
    for (; d < size; ++d) total += left[d] * right[d];
    for (int64_t c = 0; c < kChunk; ++c) total += partial[c];
    return total;
  }
}

// out = base + sum_j coefficient[j] row_of(j), for rows `size` wide (a
// null base counts as zeros)
template <int64_t Width, typename scalar_t, typename RowOf>
inline void weighted_rows(scalar_t* out, const scalar_t* base, const scalar_t* coefficient,
                          int64_t count, int64_t size, const RowOf& row_of) {
  if constexpr (vector_rows<scalar_t, Width>()) {
    constexpr int64_t lanes = Width / 4;
    float4 sum[lanes];
    for (int64_t c = 0; c < lanes; ++c) sum[c] = base == nullptr ? float4{} : load4(base + 4 * c);
    for (int64_t j = 0; j < count; ++j) {
      const float weight = coefficient[j];
      const float* row = row_of(j);
      for (int64_t c = 0; c < lanes; ++c) sum[c] += weight * load4(row + 4 * c);
    }
    for (int64_t c = 0; c < lanes; ++c) store4(out + 4 * c, sum[c]);
    return;
  }
  int64_t d = 0;
  for (; d + kChunk <= size; d += kChunk) {
    scalar_t sum[kChunk];
    for (int64_t c = 0; c < kChunk; ++c) sum[c] = base == nullptr ? scalar_t(0) : base[d + c];
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t weight = coefficient[j];
      const scalar_t* row = row_of(j) + d;
      for (int64_t c = 0; c < kChunk; ++c) sum[c] += weight * row[c];
    }
    for (int64_t c = 0; c < kChunk; ++c) out[d + c] = sum[c];
  }
  for (; d < size; ++d) {
    scalar_t sum = base == nullptr ? scalar_t(0) : base[d];
    for (int64_t j = 0; j < count; ++j) sum += coefficient[j] * row_of(j)[d];
    out[d] = sum;
  }
}

// Runs body(first, last) over ranges of families, level by level in the
// given direction, the families of a level in parallel.
template <typename Body>
void sweep_levels(const Tree& tree, bool bottom_up, const Body& body) {
  for (int64_t step = 0; step < tree.num_levels; ++step) {
    const int64_t level = bottom_up ? step : tree.num_levels - 1 - step;
    const int64_t begin = tree.level_ptr[level], end = tree.level_ptr[level + 1];
    at::parallel_for(begin, end, 64, body);
  }
}

// Per-node rows: a leaf's are the inputs, a cluster's its row of `means`
// (mean query, mean key, mean value, phi, mean squared key norm). With
// Dim > 0 the query, key and value widths are all Dim, known to the
// compiler: the loops over features unroll and vectorise.
template <typename scalar_t, int64_t Dim>
struct NodeRows {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  scalar_t* means;
  int64_t heads, runtime_dim, runtime_value_dim, width, num_leaves;

  int64_t dim() const { return Dim > 0 ? Dim : runtime_dim; }
  int64_t value_dim() const { return Dim > 0 ? Dim : runtime_value_dim; }
  scalar_t* cluster_row(int64_t node, int64_t head) const {
    return means + ((node - num_leaves) * heads + head) * width;
  }
  const scalar_t* query(int64_t node, int64_t head) const {
    return node < num_leaves ? q + (node * heads + head) * dim() : cluster_row(node, head);
  }
  const scalar_t* key(int64_t node, int64_t head) const {
    return node < num_leaves ? k + (node * heads + head) * dim() : cluster_row(node, head) + dim();
  }
  const scalar_t* value(int64_t node, int64_t head) const {
    return node < num_leaves ? v + (node * heads + head) * value_dim()
                             : cluster_row(node, head) + 2 * dim();
  }
  // the mean squared key norm (Euclidean energy)
  scalar_t key_norm(int64_t node, int64_t head) const {
    if (node < num_leaves) {
      const scalar_t* row = key(node, head);
      return dot<Dim>(row, row, dim());
    }
    return cluster_row(node, head)[2 * dim() + value_dim() + 1];
  }
};

template <typename scalar_t, int64_t Dim>
void forward_impl(const Tree& tree, const NodeRows<scalar_t, Dim>& rows, const scalar_t* bias,
                  scalar_t scale, bool euclidean, bool causal, scalar_t* weights, scalar_t* out, scalar_t* log_mass) {
  const int64_t heads = rows.heads, dim = rows.dim(), value_dim = rows.value_dim();
  const int64_t num_leaves = tree.num_leaves;
  const std::vector<double> count = leaf_counts(tree);
  const std::vector<scalar_t> log_count = logarithms<scalar_t>(count);
  const scalar_t minus_infinity = -std::numeric_limits<scalar_t>::infinity();
  const scalar_t key_scale = scalar_t(-0.5) * scale;
  // log mu of every node, per head
  auto self_log = uninitialised<scalar_t>(tree.num_nodes * heads);

  sweep_levels(tree, true, [&](int64_t first, int64_t last) {
    // per family: every child's share |C| / |A| of the parent's leaves and
    // log|C|; per family and head: the key term of every child (Euclidean
    // energy) and its rows
    std::vector<scalar_t> share, log_size, column_term, row_largest, diagonal;
    std::vector<const scalar_t*> query_row, key_row, value_row;
    for (int64_t family = first; family < last; ++family) {
      const int64_t* child = tree.children_of(family);
      const int64_t size = tree.num_children(family), parent = tree.family_node[family];
      const double parent_count = count[parent];
      for (auto* buffer : {&share, &log_size, &column_term, &row_largest, &diagonal})
        buffer->resize(size);
      for (auto* buffer : {&query_row, &key_row, &value_row}) buffer->resize(size);
      for (int64_t j = 0; j < size; ++j) {
        share[j] = static_cast<scalar_t>(count[child[j]] / parent_count);
        log_size[j] = log_count[child[j]];
      }
      for (int64_t head = 0; head < heads; ++head) {
        scalar_t* weight = weights + head * tree.num_pairs + tree.pair_ptr[family];
        const scalar_t* pair_bias =
            bias == nullptr ? nullptr : bias + head * tree.num_pairs + tree.pair_ptr[family];
        for (int64_t j = 0; j < size; ++j) {
          query_row[j] = rows.query(child[j], head);
          key_row[j] = rows.key(child[j], head);
          value_row[j] = rows.value(child[j], head);
          column_term[j] = euclidean ? key_scale * rows.key_norm(child[j], head) : scalar_t(0);
        }
        // the family's b x b scores, row by row, less the row's largest
        // (later siblings under the causal mask: -inf)
        for (int64_t i = 0; i < size; ++i) {
          const int64_t row_node = child[i];
          const scalar_t* query = query_row[i];
          scalar_t* score = weight + i * size;
          const int64_t columns = causal ? i + 1 : size;
          for (int64_t j = 0; j < columns; ++j) {
            scalar_t value = scale * dot<Dim>(query, key_row[j], dim) + column_term[j];
            if (j != i) value += log_size[j];  // a leaf's own entry is its score s_ii
            if (pair_bias != nullptr) value += pair_bias[i * size + j];
            score[j] = value;
          }
          // a cluster's own entry is -phi(B)
          if (row_node >= num_leaves)
            score[i] = -rows.cluster_row(row_node, head)[2 * dim + value_dim];
          scalar_t largest = minus_infinity;
          for (int64_t j = 0; j < columns; ++j) largest = std::max(largest, score[j]);
          row_largest[i] = largest;
          diagonal[i] = score[i];
          for (int64_t j = 0; j < columns; ++j) score[j] -= largest;
          for (int64_t j = columns; j < size; ++j) score[j] = minus_infinity;
        }
        // their exponentials in one loop over the block (it vectorises)
        for (int64_t e = 0; e < size * size; ++e) weight[e] = exponential(weight[e]);
        scalar_t parent_phi = 0;
        for (int64_t i = 0; i < size; ++i) {
          scalar_t* score = weight + i * size;
          scalar_t total = 0;
          for (int64_t j = 0; j < size; ++j) total += score[j];
          const scalar_t inverse_total = scalar_t(1) / total;
          for (int64_t j = 0; j < size; ++j) score[j] *= inverse_total;
          const scalar_t log_partition = row_largest[i] + std::log(total);
          self_log[child[i] * heads + head] = diagonal[i] - log_partition;
          parent_phi -= share[i] * log_partition;
        }
        // the parent's leaf-weighted means
        scalar_t* parent_row = rows.cluster_row(parent, head);
        const scalar_t* zeros = nullptr;
        weighted_rows<Dim>(parent_row, zeros, share.data(), size, dim,
                           [&](int64_t j) { return query_row[j]; });
        weighted_rows<Dim>(parent_row + dim, zeros, share.data(), size, dim,
                           [&](int64_t j) { return key_row[j]; });
        weighted_rows<Dim>(parent_row + 2 * dim, zeros, share.data(), size, value_dim,
                           [&](int64_t j) { return value_row[j]; });
        scalar_t parent_key_norm = 0;
        if (euclidean)
          for (int64_t i = 0; i < size; ++i)
            parent_key_norm += share[i] * rows.key_norm(child[i], head);
        parent_row[2 * dim + value_dim] = parent_phi;
        parent_row[2 * dim + value_dim + 1] = parent_key_norm;
      }
    }
  });

  // top-down: u (what reaches a cluster from its ancestors' siblings), log P
  const int64_t num_clusters = tree.num_nodes - num_leaves;
  const std::vector<char> parented = has_parent(tree);
  auto message = uninitialised<scalar_t>(num_clusters * heads * value_dim);
  zero_roots(message.get(), parented, num_leaves, heads, value_dim);
  sweep_levels(tree, false, [&](int64_t first, int64_t last) {
    std::vector<scalar_t> row_weight;  // P(A) w_ij of one row
    std::vector<const scalar_t*> value_row;
    for (int64_t family = first; family < last; ++family) {
      const int64_t* child = tree.children_of(family);
      const int64_t size = tree.num_children(family), parent = tree.family_node[family];
      row_weight.resize(size);
      value_row.resize(size);
      for (int64_t head = 0; head < heads; ++head) {
        for (int64_t j = 0; j < size; ++j) value_row[j] = rows.value(child[j], head);
        const scalar_t* weight = weights + head * tree.num_pairs + tree.pair_ptr[family];
        const scalar_t parent_log_mass = log_mass[parent * heads + head];
        const scalar_t parent_mass = std::exp(parent_log_mass);
        const scalar_t* parent_message =
            message.get() + ((parent - num_leaves) * heads + head) * value_dim;
        auto value_of = [&](int64_t j) { return value_row[j]; };
        for (int64_t i = 0; i < size; ++i) {
          const int64_t node = child[i];
          const int64_t columns = causal ? i + 1 : size;
          for (int64_t j = 0; j < columns; ++j) row_weight[j] = parent_mass * weight[i * size + j];
          log_mass[node * heads + head] = parent_log_mass + self_log[node * heads + head];
          // y_i = u_A + P(A) sum_j w_ij v_j: a leaf's output; a cluster
          // hands y_i less its own share further down
          scalar_t* target = out + (node * heads + head) * value_dim;
          if (node >= num_leaves) {
            row_weight[i] = 0;
            target = message.get() + ((node - num_leaves) * heads + head) * value_dim;
          }
          weighted_rows<Dim>(target, parent_message, row_weight.data(), columns, value_dim, value_of);
        }
      }
    }
  });
  // an isolated leaf (a tree of its own) attends to itself
  isolated_rows(out, rows.v, parented, num_leaves, heads * value_dim);
}

// Calls body(std::integral_constant<int64_t, Dim>) with Dim the common
// width of queries and values when it is a usual head width, else 0.
template <typename Body>
void with_fixed_dim(int64_t dim, int64_t value_dim, const Body& body) {
  if (dim == value_dim) {
    switch (dim) {
      case 8: return body(std::integral_constant<int64_t, 8>());
      case 16: return body(std::integral_constant<int64_t, 16>());
      case 32: return body(std::integral_constant<int64_t, 32>());
      case 64: return body(std::integral_constant<int64_t, 64>());
      default: break;
    }
  }
  body(std::integral_constant<int64_t, 0>());
}

std::vector<at::Tensor> check_inputs(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "hsa_sweeps: q, k [N, H, D] and v [N, H, D_v] expected");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "hsa_sweeps: q, k and v must share a dtype");
  return {q.contiguous(), k.contiguous(), v.contiguous()};
}

// Returns the output [N, H, D_v], the clusters' rows [M, H, 2D + D_v + 2],
// the weights [H, pairs] and log P of every node [N + M, H].
std::vector<at::Tensor> hsa_sweeps_forward(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const c10::optional<at::Tensor>& pair_bias, const at::Tensor& family_node,
    const at::Tensor& child_ptr, const at::Tensor& children, const at::Tensor& pair_ptr,
    const at::Tensor& level_ptr, int64_t num_nodes, double scale,
    bool euclidean, bool causal) {
  check_tables(family_node, child_ptr, children, pair_ptr, level_ptr);
  auto inputs = check_inputs(q_, k_, v_);
  const at::Tensor &q = inputs[0], &k = inputs[1], &v = inputs[2];
  const int64_t num_leaves = q.size(0), heads = q.size(1), dim = q.size(2), value_dim = v.size(2);
  Tree tree(family_node, child_ptr, children, pair_ptr, level_ptr, num_leaves,
            num_nodes);
  const int64_t width = 2 * dim + value_dim + 2;
  at::Tensor means = fresh({num_nodes - num_leaves, heads, width}, q.options());
  at::Tensor weights = fresh({heads, tree.num_pairs}, q.options());
  at::Tensor out = fresh(v.sizes(), v.options());
  at::Tensor log_mass = fresh({num_nodes, heads}, q.options()).zero_();
  at::Tensor bias;
  if (pair_bias.has_value() && pair_bias->defined()) {
    bias = pair_bias->to(q.scalar_type()).contiguous();
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == heads && bias.size(1) == tree.num_pairs,
                "hsa_sweeps: pair bias [H, E] expected, one column per ordered sibling pair");
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hsa_sweeps_forward", [&] {
    with_fixed_dim(dim, value_dim, [&](auto fixed) {
      constexpr int64_t Dim = decltype(fixed)::value;
      NodeRows<scalar_t, Dim> rows{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                   v.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
                                   heads, dim, value_dim, width, num_leaves};
      forward_impl<scalar_t, Dim>(
          tree, rows, bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
          static_cast<scalar_t>(scale), euclidean, causal,
          weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), log_mass.data_ptr<scalar_t>());
    });
  });
  return {out, means, weights, log_mass};
}

// Upstream gradients of some clusters' rows of `means` (their mean query,
// key, value, phi and mean squared key norm), e.g. of the parts of a
// distributed hierarchy: `grad` [nodes, heads, width], `index` the row of
// every cluster's gradient (-1 for none); no gradients when null.
template <typename scalar_t>
struct SummaryGradients {
  const scalar_t* grad;
  const int64_t* index;
  int64_t heads, width, num_leaves;

  const scalar_t* row(int64_t node, int64_t head) const {
    if (grad == nullptr) return nullptr;
    const int64_t r = index[node - num_leaves];
    return r < 0 ? nullptr : grad + (r * heads + head) * width;
  }
};

template <typename scalar_t, int64_t Dim>
void backward_impl(const Tree& tree, const NodeRows<scalar_t, Dim>& rows, const scalar_t* grad_out,
                   const scalar_t* weights, const scalar_t* log_mass, scalar_t scale,
                   bool euclidean, bool causal, const SummaryGradients<scalar_t>& summary_grad,
                   const scalar_t* leaf_log_mass_grad, scalar_t* grad_bias,
                   scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v) {
  const int64_t heads = rows.heads, dim = rows.dim(), value_dim = rows.value_dim();
  const int64_t num_leaves = tree.num_leaves, num_clusters = tree.num_nodes - num_leaves;
  const std::vector<double> count = leaf_counts(tree);
  // bottom-up: the summed upstream gradient G and `through` (dL/dlog P) of
  // every cluster, from the couplings w_ij (G_i . v_j) of its pairs. The
  // products G_i . v_j are kept for the way down ([H, pairs], as large as
  // the weights, and freed with the call): computing them again there cost
  // about a sixth of the backward pass on documents of 256 word pieces
  // (nothing measurable on molecules).
  auto gradient = uninitialised<scalar_t>(num_clusters * heads * value_dim);
  auto products = uninitialised<scalar_t>(heads * tree.num_pairs);
  auto through = uninitialised<scalar_t>(tree.num_nodes * heads);
  const std::vector<char> parented = has_parent(tree);
  auto gradient_row = [&](int64_t node, int64_t head) -> const scalar_t* {
    return node < num_leaves ? grad_out + (node * heads + head) * value_dim
                             : gradient.get() + ((node - num_leaves) * heads + head) * value_dim;
  };
  sweep_levels(tree, true, [&](int64_t first, int64_t last) {
    std::vector<const scalar_t*> value_row;
    for (int64_t family = first; family < last; ++family) {
      const int64_t* child = tree.children_of(family);
      const int64_t size = tree.num_children(family), parent = tree.family_node[family];
      value_row.resize(size);
      for (int64_t head = 0; head < heads; ++head) {
        for (int64_t j = 0; j < size; ++j) value_row[j] = rows.value(child[j], head);
        const scalar_t* weight = weights + head * tree.num_pairs + tree.pair_ptr[family];
        scalar_t* product = products.get() + head * tree.num_pairs + tree.pair_ptr[family];
        const scalar_t parent_mass = std::exp(log_mass[parent * heads + head]);
        scalar_t* parent_gradient =
            gradient.get() + ((parent - num_leaves) * heads + head) * value_dim;
        std::fill_n(parent_gradient, value_dim, scalar_t(0));
        scalar_t parent_through = 0, off_diagonal = 0;
        for (int64_t i = 0; i < size; ++i) {
          const int64_t node = child[i];
          const scalar_t* grad = gradient_row(node, head);
          const int64_t columns = causal ? i + 1 : size;
          for (int64_t j = 0; j < columns; ++j) {
            product[i * size + j] = dot<Dim>(grad, value_row[j], value_dim);
            if (j != i) off_diagonal += weight[i * size + j] * product[i * size + j];
          }
          if (node < num_leaves) {  // through of a leaf: P(i) (g_i . v_i) + dL/dlog a_ii
            through[node * heads + head] =
                std::exp(log_mass[node * heads + head]) * product[i * size + i];
            if (leaf_log_mass_grad != nullptr)
              through[node * heads + head] += leaf_log_mass_grad[node * heads + head];
          }
          parent_through += through[node * heads + head];
          for (int64_t d = 0; d < value_dim; ++d) parent_gradient[d] += grad[d];
        }
        through[parent * heads + head] = parent_through + parent_mass * off_diagonal;
      }
    }
  });

  // top-down: delta (dL/d of the node's own diagonal score) and the
  // accumulated gradients of the mean query, key, value and key-norm term
  const int64_t acc_width = 2 * dim + value_dim + 1;
  auto delta = uninitialised<scalar_t>(num_clusters * heads);
  auto accumulated = uninitialised<scalar_t>(num_clusters * heads * acc_width);
  zero_roots(delta.get(), parented, num_leaves, heads, 1);
  zero_roots(accumulated.get(), parented, num_leaves, heads, acc_width);
  // Upstream gradients of a cluster's row (its means, phi, key norm) enter
  // where that row's gradient is formed: a mean's gradient, shared by its
  // |B| leaves, is accumulated for them; phi's enters delta_B = dL/d(-phi(B)).
  auto add_summary_gradient = [&](int64_t node, int64_t head) {
    const scalar_t* grad = summary_grad.row(node, head);
    if (grad == nullptr) return;
    const scalar_t inverse_count = static_cast<scalar_t>(1.0 / count[node]);
    scalar_t* acc = accumulated.get() + ((node - num_leaves) * heads + head) * acc_width;
    for (int64_t c = 0; c < 2 * dim + value_dim; ++c) acc[c] += inverse_count * grad[c];
    delta[(node - num_leaves) * heads + head] -= grad[2 * dim + value_dim];
    // d mean|k|^2 / dk_j = 2 k_j / |B|; a unit of gamma gives -scale k_j
    if (euclidean)
      acc[acc_width - 1] -= 2 * inverse_count * grad[2 * dim + value_dim + 1] / scale;
  };
  for (int64_t node = num_leaves; node < tree.num_nodes; ++node)
    if (!parented[node])
      for (int64_t head = 0; head < heads; ++head) add_summary_gradient(node, head);
  std::vector<scalar_t> leaf_gamma(euclidean ? num_leaves * heads : 0, 0);
  sweep_levels(tree, false, [&](int64_t first, int64_t last) {
    std::vector<scalar_t> residual, grad_scores, coefficients;
    std::vector<const scalar_t*> query_row, key_row, gradient_of_row;
    for (int64_t family = first; family < last; ++family) {
      const int64_t* child = tree.children_of(family);
      const int64_t size = tree.num_children(family), parent = tree.family_node[family];
      const double parent_count = count[parent];
      residual.resize(size);
      grad_scores.resize(size * size);
      coefficients.resize(3 * size);
      for (auto* buffer : {&query_row, &key_row, &gradient_of_row})
        buffer->resize(size);
      for (int64_t head = 0; head < heads; ++head) {
        for (int64_t j = 0; j < size; ++j) {
          query_row[j] = rows.query(child[j], head);
          key_row[j] = rows.key(child[j], head);
          gradient_of_row[j] = gradient_row(child[j], head);
        }
        const scalar_t* weight = weights + head * tree.num_pairs + tree.pair_ptr[family];
        const scalar_t* product = products.get() + head * tree.num_pairs + tree.pair_ptr[family];
        scalar_t* grad_score = grad_scores.data();
        const scalar_t parent_mass = std::exp(log_mass[parent * heads + head]);
        const scalar_t parent_delta = delta[(parent - num_leaves) * heads + head];
        const scalar_t* parent_acc =
            accumulated.get() + ((parent - num_leaves) * heads + head) * acc_width;
        // couplings c_ij = w_ij (G_i . v_j), then
        // residual_i = P(A) sum_{j != i} c_ij + through_i - delta_A |B_i| / |A|
        for (int64_t i = 0; i < size; ++i) {
          const int64_t columns = causal ? i + 1 : size;
          scalar_t row_sum = 0;
          for (int64_t j = 0; j < columns; ++j) {
            const scalar_t value = weight[i * size + j] * product[i * size + j];
            grad_score[i * size + j] = value;
            if (j != i) row_sum += value;
          }
          for (int64_t j = columns; j < size; ++j) grad_score[i * size + j] = 0;
          residual[i] = parent_mass * row_sum + through[child[i] * heads + head] -
                        parent_delta * static_cast<scalar_t>(count[child[i]] / parent_count);
        }
        // score gradients P(A) c_ij - w_ij residual_i off the diagonal; on
        // it, through_i - w_ii residual_i for a leaf (through_i = dL/dlog P(i)
        // is P(A) c_ii plus the upstream gradient of log a_ii), while a
        // cluster's own diagonal is -phi: it reaches q, k and the bias
        // through delta
        for (int64_t i = 0; i < size; ++i) {
          for (int64_t j = 0; j < size; ++j)
            grad_score[i * size + j] =
                parent_mass * grad_score[i * size + j] - weight[i * size + j] * residual[i];
          grad_score[i * size + i] =
              child[i] >= num_leaves
                  ? 0
                  : through[child[i] * heads + head] - weight[i * size + i] * residual[i];
          if (grad_bias != nullptr) {
            scalar_t* head_bias = grad_bias + head * tree.num_pairs + tree.pair_ptr[family];
            for (int64_t j = 0; j < size; ++j) head_bias[i * size + j] = grad_score[i * size + j];
          }
        }
        // A child's gradient is its ancestors' accumulated share plus its
        // own products, divided among its |B| leaves: row i of the score
        // gradients weighs the keys (for the query), column i the queries
        // (for the key) and the upstream gradients (for the value).
        auto key_of = [&](int64_t j) { return key_row[j]; };
        auto query_of = [&](int64_t j) { return query_row[j]; };
        auto gradient_of = [&](int64_t j) { return gradient_of_row[j]; };
        for (int64_t i = 0; i < size; ++i) {
          const int64_t node = child[i];
          const bool cluster = node >= num_leaves;
          const scalar_t inverse_count = static_cast<scalar_t>(1.0 / count[node]);
          scalar_t* query_weight = coefficients.data();
          scalar_t* key_weight = query_weight + size;
          scalar_t* value_weight = key_weight + size;
          scalar_t gamma = 0;
          for (int64_t j = 0; j < size; ++j) {
            query_weight[j] = scale * inverse_count * grad_score[i * size + j];
            key_weight[j] = scale * inverse_count * grad_score[j * size + i];
            value_weight[j] = inverse_count * parent_mass * weight[j * size + i];
            gamma += grad_score[j * size + i];
          }
          if (cluster) value_weight[i] = 0;
          const int64_t offset = node * heads + head;
          scalar_t* cluster_acc =
              cluster ? accumulated.get() + ((node - num_leaves) * heads + head) * acc_width
                      : nullptr;
          scalar_t* query_target = cluster ? cluster_acc : grad_q + offset * dim;
          scalar_t* key_target = cluster ? cluster_acc + dim : grad_k + offset * dim;
          scalar_t* value_target = cluster ? cluster_acc + 2 * dim : grad_v + offset * value_dim;
          weighted_rows<Dim>(query_target, parent_acc, query_weight, size, dim, key_of);
          weighted_rows<Dim>(key_target, parent_acc + dim, key_weight, size, dim, query_of);
          weighted_rows<Dim>(value_target, parent_acc + 2 * dim, value_weight, size, value_dim,
                        gradient_of);
          const scalar_t new_gamma = parent_acc[acc_width - 1] + inverse_count * gamma;
          if (cluster) {
            delta[(node - num_leaves) * heads + head] =
                through[node * heads + head] - weight[i * size + i] * residual[i];
            cluster_acc[acc_width - 1] = new_gamma;
            add_summary_gradient(node, head);
          } else if (euclidean) {
            leaf_gamma[offset] = new_gamma;
          }
        }
      }
    }
  });
  // an isolated leaf's output is its own value
  isolated_rows<scalar_t>(grad_q, nullptr, parented, num_leaves, heads * dim);
  isolated_rows<scalar_t>(grad_k, nullptr, parented, num_leaves, heads * dim);
  isolated_rows<scalar_t>(grad_v, grad_out, parented, num_leaves, heads * value_dim);
  if (euclidean) {  // d s_ij / d k_j gains -scale k_j per unit of gamma
    for (int64_t offset = 0; offset < num_leaves * heads; ++offset) {
      const scalar_t* key = rows.k + offset * dim;
      for (int64_t d = 0; d < dim; ++d)
        grad_k[offset * dim + d] -= scale * leaf_gamma[offset] * key[d];
    }
  }
}

// Returns the gradients of q, k, v and (when bias_grad) the padded pair bias.
std::vector<at::Tensor> hsa_sweeps_backward(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& means, const at::Tensor& weights, const at::Tensor& log_mass,
    const at::Tensor& family_node, const at::Tensor& child_ptr, const at::Tensor& children,
    const at::Tensor& pair_ptr, const at::Tensor& level_ptr, double scale, bool euclidean,
    bool causal, bool bias_grad, const c10::optional<at::Tensor>& summary_nodes,
    const c10::optional<at::Tensor>& summary_grad_,
    const c10::optional<at::Tensor>& leaf_log_mass_grad_) {
  check_tables(family_node, child_ptr, children, pair_ptr, level_ptr);
  auto inputs = check_inputs(q_, k_, v_);
  const at::Tensor &q = inputs[0], &k = inputs[1], &v = inputs[2];
  const int64_t num_leaves = q.size(0), heads = q.size(1), dim = q.size(2), value_dim = v.size(2);
  const int64_t num_nodes = log_mass.size(0);
  Tree tree(family_node, child_ptr, children, pair_ptr, level_ptr, num_leaves,
            num_nodes);
  at::Tensor grad_out = grad_out_.to(q.scalar_type()).contiguous();
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "hsa_sweeps: grad_out must match v");
  at::Tensor grad_q = fresh(q.sizes(), q.options()), grad_k = fresh(k.sizes(), k.options()),
             grad_v = fresh(v.sizes(), v.options());
  at::Tensor grad_bias =
      bias_grad ? fresh({heads, tree.num_pairs}, q.options()).zero_() : at::Tensor();
  at::Tensor summary_grad, summary_index;
  if (summary_grad_.has_value() && summary_grad_->defined()) {
    TORCH_CHECK(summary_nodes.has_value() && summary_nodes->defined(),
                "hsa_sweeps: summary gradients need their nodes");
    summary_grad = summary_grad_->to(q.scalar_type()).contiguous();
    const at::Tensor nodes = summary_nodes->to(at::kLong).contiguous();
    TORCH_CHECK(summary_grad.dim() == 3 && summary_grad.size(0) == nodes.numel() &&
                    summary_grad.size(1) == heads && summary_grad.size(2) == means.size(2),
                "hsa_sweeps: summary gradients [nodes, H, means width] expected");
    // the row of every cluster's gradient, -1 for none
    summary_index = at::full({num_nodes - num_leaves}, -1, nodes.options());
    const int64_t* node = nodes.data_ptr<int64_t>();
    int64_t* index = summary_index.data_ptr<int64_t>();
    for (int64_t r = 0; r < nodes.numel(); ++r) {
      TORCH_CHECK(node[r] >= num_leaves && node[r] < num_nodes,
                  "hsa_sweeps: summary nodes must be clusters");
      index[node[r] - num_leaves] = r;
    }
  }
  // upstream gradients of log a_ii = log P(i) [N, H]: they join `through`
  at::Tensor leaf_log_mass_grad;
  if (leaf_log_mass_grad_.has_value() && leaf_log_mass_grad_->defined()) {
    leaf_log_mass_grad = leaf_log_mass_grad_->to(q.scalar_type()).contiguous();
    TORCH_CHECK(leaf_log_mass_grad.dim() == 2 && leaf_log_mass_grad.size(0) == num_leaves &&
                    leaf_log_mass_grad.size(1) == heads,
                "hsa_sweeps: gradients of the leaves' log mass [N, H] expected");
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hsa_sweeps_backward", [&] {
    with_fixed_dim(dim, value_dim, [&](auto fixed) {
      constexpr int64_t Dim = decltype(fixed)::value;
      NodeRows<scalar_t, Dim> rows{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                   v.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
                                   heads, dim, value_dim, means.size(2), num_leaves};
      backward_impl<scalar_t, Dim>(
          tree, rows, grad_out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
          log_mass.data_ptr<scalar_t>(), static_cast<scalar_t>(scale), euclidean, causal,
          SummaryGradients<scalar_t>{
              summary_grad.defined() ? summary_grad.data_ptr<scalar_t>() : nullptr,
              summary_index.defined() ? summary_index.data_ptr<int64_t>() : nullptr, heads,
              means.size(2), num_leaves},
          leaf_log_mass_grad.defined() ? leaf_log_mass_grad.data_ptr<scalar_t>() : nullptr,
          bias_grad ? grad_bias.data_ptr<scalar_t>() : nullptr,
          grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>());
    });
  });
  if (!bias_grad) grad_bias = at::empty({0}, q.options());
  return {grad_q, grad_k, grad_v, grad_bias};
}

}  // namespace

TORCH_LIBRARY(hsa_geo_cpu, m) {
  m.def(
      "sweeps_forward(Tensor q, Tensor k, Tensor v, Tensor? pair_bias, Tensor family_node, "
      "Tensor child_ptr, Tensor children, Tensor pair_ptr, Tensor level_ptr, "
      "int num_nodes, float scale, bool euclidean, bool causal) -> Tensor[]");
  m.def(
      "sweeps_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor means, "
      "Tensor weights, Tensor log_mass, Tensor family_node, Tensor child_ptr, Tensor children, "
      "Tensor pair_ptr, Tensor level_ptr, float scale, "
      "bool euclidean, bool causal, bool bias_grad, Tensor? summary_nodes=None, "
      "Tensor? summary_grad=None, Tensor? leaf_log_mass_grad=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(hsa_geo_cpu, CPU, m) {
  m.impl("sweeps_forward", &hsa_sweeps_forward);
  m.impl("sweeps_backward", &hsa_sweeps_backward);
}
