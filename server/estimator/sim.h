// Internal to the estimator: a byte-exact model of a device's allocator and of LibTorch's
// autograd, without tensors. A `Tensor` here is a shared handle to a block of bytes; when
// the last handle goes, the bytes are freed, exactly as with at::Tensor. Ops (op_table.h)
// allocate their outputs and transients, record a backward node that captures what the
// real op saves, and the engine runs those nodes in reverse order of creation with the
// real engine's gradient-buffer rules. The timeline's peak is the estimate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <deque>
#include <map>
#include <memory>
#include <memory_resource>
#include <set>
#include <tuple>
#include <string>
#include <vector>

namespace memfit::estimator::sim {

// PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, its defaults):
// what it reserves from the device for the same sequence of allocations and frees.
// Requests are rounded up to 512 B. Those of at most 1 MiB come from a small pool of
// 2 MiB segments; larger ones from a large pool whose new segments are 20 MiB for
// requests under 10 MiB, else the request rounded up to 2 MiB. A request takes the
// smallest free block that fits (then the lowest address), split when the rest is at
// least 512 B (small pool) or over 1 MiB (large pool); a freed block merges with free
// neighbours in its segment; segments are never given back. Reserved = their sum.
class CachingAllocatorModel {
 public:
  int64_t alloc(int64_t bytes);  // a block id (-1 for 0 bytes)
  void free(int64_t id);
  int64_t reserved() const { return reserved_; }

 private:
  struct Blk {
    int64_t segment, offset, size;
    int64_t prev = -1, next = -1;  // neighbours in the segment
    bool small = false, free = false;
  };
  using Key = std::tuple<int64_t, int64_t, int64_t>;  // size, segment, offset: best fit, then address
  std::vector<Blk> blocks_;
  std::vector<int64_t> spare_;  // ids of merged-away blocks, reused
  std::set<Key> free_small_, free_large_;
  std::map<std::pair<int64_t, int64_t>, int64_t> at_;  // (segment, offset) of a free block -> id
  int64_t reserved_ = 0, segments_ = 0;
  int64_t new_id(const Blk& b);
  void insert_free(int64_t id);
  void erase_free(int64_t id);
};

// Bytes live now and at their peak, per phase. Arithmetic is checked: the sum of a
// timeline can exceed int64 only for absurd inputs, which raise EstimateError.
class Timeline {
 public:
  explicit Timeline(int64_t granularity = 1) : granularity_(granularity) {}
  int64_t alloc(int64_t bytes);  // returns the bytes charged (rounded)
  void free(int64_t charged);
  int64_t current() const { return current_; }
  int64_t peak() const { return peak_; }
  // Phases: the peak since begin(name), kept as the max over all begins of that name.
  void begin(const std::string& phase);
  void end();
  const std::map<std::string, int64_t>& phase_peaks() const { return phase_peaks_; }
  int64_t allocations() const { return allocations_; }
  int64_t charge(int64_t bytes) const {
    return granularity_ > 1 && bytes > 0 ? (bytes + granularity_ - 1) / granularity_ * granularity_ : bytes;
  }
  // A shadow timeline offset from this one by `offset` bytes, whose peaks count too:
  // gradient accumulation's later micro-batches are the first one plus the gradients
  // not yet formed (the estimator moves the offset as gradients land).
  void shadow(bool on, int64_t offset) {
    shadow_on_ = on;
    shadow_offset_ = offset;
  }
  void shadow_add(int64_t delta) { shadow_offset_ += delta; }
  // CUDA: also model the caching allocator; reserved_peak() is then what it held at most.
  void model_cache(bool on) { cache_on_ = on; }
  int64_t last_block() const { return last_block_; }
  void free(int64_t charged, int64_t block);
  int64_t reserved_peak() const { return reserved_peak_; }

 private:
  bool cache_on_ = false;
  CachingAllocatorModel cache_;
  int64_t last_block_ = -1, reserved_peak_ = 0;
  int64_t granularity_;
  int64_t current_ = 0, peak_ = 0, phase_start_peak_ = 0;
  int64_t allocations_ = 0;
  bool shadow_on_ = false;
  int64_t shadow_offset_ = 0;
  std::string phase_;
  std::map<std::string, int64_t> phase_peaks_;
};

struct Block {
  Timeline* t;
  int64_t charged;
  bool kept = false;  // owned by an entry of the kept breakdown
  int64_t id;         // the caching allocator model's block (-1: none)
  Block(Timeline* tl, int64_t c) : t(tl), charged(c), id(tl->last_block()) {}
  ~Block() { t->free(charged, id); }
};

struct Node;
struct Leaf;

// Where a tensor's gradient goes: a node's input slot, or a leaf's .grad.
struct Edge {
  Node* node = nullptr;
  int slot = 0;
  Leaf* leaf = nullptr;
  bool valid() const { return node != nullptr || leaf != nullptr; }
};

struct Tensor {
  std::shared_ptr<Block> block;
  int64_t numel = 0;
  int64_t esize = 4;  // bytes per element
  Edge edge;          // empty: needs no gradient
  bool contiguous = true;  // dense row-major: .contiguous() is free
  bool viewable = true;    // flattening to [-1, last dim] is a view (no copy)
  // A view whose own TensorImpl nobody else holds although its storage is shared:
  // AccumulateGrad steals it (LibTorch counts the tensor's references, not the
  // storage's), and the whole storage then lives as long as .grad.
  bool sole_view = false;
  bool defined() const { return block != nullptr; }
  bool requires_grad() const { return edge.valid(); }
  int64_t bytes() const { return numel * esize; }
  // A view: the same block, the same gradient edge.
  Tensor view() const { return *this; }
  Tensor detach() const {
    Tensor t = *this;
    t.edge = Edge{};
    return t;
  }
  long use_count() const { return block ? block.use_count() : 0; }
};

// A parameter (or a checkpointed block's input) whose gradient accumulates in .grad.
// As in LibTorch, every contribution first lands in the input buffer of the leaf's
// AccumulateGrad node, which runs once all the edges into it have delivered: a leaf used
// twice (tied embeddings) holds its first contribution until the second arrives.
struct Leaf {
  Tensor grad;
  Tensor buffer;       // contributions so far in this backward
  int pending = 0;     // edges into this leaf not yet delivered in this backward
  int64_t grad_esize = 4;
  bool param = false;  // a trainable parameter (its gradient outlives backward)
};

using Grads = std::vector<Tensor>;
// A backward function: gradients of the node's outputs in, of its inputs out (one per
// edge, undefined where none flows). It captures what the op saved.
using BackwardFn = std::function<Grads(Grads&)>;

struct Node {
  int64_t seq = 0;
  bool live = false;       // reachable from the root of the running backward
  std::vector<Edge> next;  // one per input
  Grads buffer;            // one per output
  std::vector<Tensor> saved;  // what the op keeps; released after the node runs
  BackwardFn fn;
};

class Sim;

// Kept-bytes bookkeeping for the breakdown: the first op to keep a block owns its bytes.
struct KeptEntry {
  const std::string* where;  // "layer 3" / "head" / "embeddings" (Sim::where at the time)
  std::string op;            // "ms_layer_norm", "linear(mlp.c_fc)", ...
  int64_t bytes = 0;
};

class Sim {
 public:
  explicit Sim(int64_t granularity) : timeline(granularity) { set_where("model"); }
  Timeline timeline;
  bool grad_mode = true;
  // How the engine adds a second gradient into an input buffer (a node's or a leaf's).
  // LibTorch 1.13 (Debian's CPU build) always forms old + new out of place for dense
  // tensors; 2.x adds into the old one in place when it holds the only reference.
  bool grad_buffer_in_place = false;
  // Scratch counted as if every CPU thread held its largest buffers at once: the most a
  // single op's worst case exceeds one thread's (the estimate's safe-bound slack).
  int64_t thread_slack = 0;
  // CPU bf16 matrix products (LibTorch 1.13's oneDNN): packing buffers from the CPU
  // allocator, charged as a bound per product (0 threads: none, e.g. CUDA or fp32).
  int cpu_bf16_gemm_threads = 0;
  int64_t gemm_slack = 0;
  void bound_threads(int64_t threads, int64_t per_thread) {
    if (threads > 1) thread_slack = std::max(thread_slack, (threads - 1) * per_thread);
  }
  // Label for the breakdown: set_where("layer 0"); entries point at interned names.
  void set_where(const std::string& w) { where_ = &*wheres_.insert(w).first; }
  // Called when a leaf gets its first gradient (the accumulation shadow).
  std::function<void(int64_t)> on_first_grad;

  // A new tensor of n elements of `esize` bytes.
  Tensor empty(int64_t numel, int64_t esize);
  // Charges a transient buffer for the duration of the caller's scope.
  Tensor scratch(int64_t numel, int64_t esize) { return empty(numel, esize); }

  // Records a node if grad mode is on and any input needs a gradient. The outputs get
  // edges to it. `saved` is what the real op keeps (shared handles: no new bytes).
  // Returns the node, or nullptr when nothing was recorded (and nothing kept).
  Node* record(const std::string& op, std::initializer_list<const Tensor*> inputs,
               std::initializer_list<Tensor*> outputs, std::initializer_list<Tensor> saved, BackwardFn fn);

  // loss.backward(seed): runs the reachable nodes of the graphs recorded since the
  // last backward, newest first, as LibTorch's engine does on one device.
  void backward(const Tensor& root, Tensor seed);
  // Checkpointing: nodes recorded inside fn go to a nested graph run by backward_nested.
  void push_graph();
  void backward_nested(const Tensor& root, Tensor seed);
  // Frees the graph (the loss tensor went out of scope with everything it kept).
  void drop_graph();
  // Kept until the graph is freed, not when its node has run: what a custom function
  // puts in ctx->saved_data (release_variables() clears only its saved tensors).
  void hold_until_drop(const Tensor& t) { held_.push_back(t); }

  Leaf* new_leaf(int64_t grad_esize, bool param);
  const std::vector<KeptEntry>& kept() const { return kept_; }
  void reset_kept() { kept_.clear(); }

 private:
  void accumulate(const Edge& e, Tensor g);
  void add_into(Tensor& slot, Tensor g);
  void delivered(Leaf& l);
  void accumulate_grad(Leaf& l);
  void count_edges(const Tensor& root, std::deque<Node>& nodes);
  void run(std::deque<Node>& nodes);
  // Blocks come from an arena (an estimate allocates thousands of small objects; freeing
  // them one by one is most of the work otherwise).
  std::pmr::monotonic_buffer_resource arena_{64 << 10};
  std::deque<std::deque<Node>> graphs_ = std::deque<std::deque<Node>>(1);
  std::vector<std::unique_ptr<Leaf>> leaves_;
  std::vector<Tensor> held_;
  int64_t seq_ = 0;
  std::vector<KeptEntry> kept_;
  std::set<std::string> wheres_;
  const std::string* where_ = nullptr;
};

}  // namespace memfit::estimator::sim
