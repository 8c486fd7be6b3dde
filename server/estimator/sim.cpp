#include "sim.h"

#include <cstdio>
#include <cstdlib>
#include <limits>

#include "estimator.h"

namespace memfit::estimator::sim {

namespace {
// MEMFIT_ESTIMATE_TRACE=1: the timeline's allocations and frees on stderr, in the format
// of the worker's MEMFIT_ALLOC_TRACE, with the phases marked.
const bool g_trace = [] {
  const char* v = std::getenv("MEMFIT_ESTIMATE_TRACE");
  return v != nullptr && *v != '\0' && *v != '0';
}();
}  // namespace

int64_t CachingAllocatorModel::new_id(const Blk& b) {
  if (!spare_.empty()) {
    const int64_t id = spare_.back();
    spare_.pop_back();
    blocks_[static_cast<size_t>(id)] = b;
    return id;
  }
  blocks_.push_back(b);
  return static_cast<int64_t>(blocks_.size()) - 1;
}

void CachingAllocatorModel::insert_free(int64_t id) {
  Blk& b = blocks_[static_cast<size_t>(id)];
  b.free = true;
  (b.small ? free_small_ : free_large_).insert({b.size, b.segment, b.offset});
  at_[{b.segment, b.offset}] = id;
}

void CachingAllocatorModel::erase_free(int64_t id) {
  Blk& b = blocks_[static_cast<size_t>(id)];
  b.free = false;
  (b.small ? free_small_ : free_large_).erase({b.size, b.segment, b.offset});
  at_.erase({b.segment, b.offset});
}

int64_t CachingAllocatorModel::alloc(int64_t bytes) {
  if (bytes <= 0) return -1;
  constexpr int64_t kMinBlock = 512, kSmallSize = int64_t{1} << 20, kSmallBuffer = int64_t{2} << 20,
                    kLargeBuffer = int64_t{20} << 20, kMinLargeAlloc = int64_t{10} << 20,
                    kRoundLarge = int64_t{2} << 20;
  const int64_t size = (bytes + kMinBlock - 1) / kMinBlock * kMinBlock;
  const bool small = size <= kSmallSize;
  std::set<Key>& pool = small ? free_small_ : free_large_;
  int64_t id;
  auto it = pool.lower_bound({size, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::min()});
  if (it != pool.end()) {
    id = at_.at({std::get<1>(*it), std::get<2>(*it)});
    erase_free(id);
  } else {
    const int64_t seg = small ? kSmallBuffer
                        : size < kMinLargeAlloc ? kLargeBuffer
                                                : (size + kRoundLarge - 1) / kRoundLarge * kRoundLarge;
    Blk b;
    b.segment = segments_++;
    b.offset = 0;
    b.size = seg;
    b.small = small;
    id = new_id(b);
    reserved_ += seg;
  }
  Blk& b = blocks_[static_cast<size_t>(id)];
  const int64_t rest = b.size - size;
  if (small ? rest >= kMinBlock : rest > kSmallSize) {
    Blk r;
    r.segment = b.segment;
    r.offset = b.offset + size;
    r.size = rest;
    r.small = small;
    r.prev = id;
    r.next = b.next;
    const int64_t rid = new_id(r);
    Blk& bb = blocks_[static_cast<size_t>(id)];  // new_id may have moved the vector
    if (bb.next >= 0) blocks_[static_cast<size_t>(bb.next)].prev = rid;
    bb.next = rid;
    bb.size = size;
    insert_free(rid);
  }
  return id;
}

void CachingAllocatorModel::free(int64_t id) {
  if (id < 0) return;
  // Merge with free neighbours of the same segment.
  for (int side = 0; side < 2; ++side) {
    Blk& b = blocks_[static_cast<size_t>(id)];
    const int64_t n = side == 0 ? b.prev : b.next;
    if (n < 0 || !blocks_[static_cast<size_t>(n)].free) continue;
    erase_free(n);
    Blk& nb = blocks_[static_cast<size_t>(n)];
    if (side == 0) {  // n precedes b: b grows down into n
      b.offset = nb.offset;
      b.prev = nb.prev;
      if (b.prev >= 0) blocks_[static_cast<size_t>(b.prev)].next = id;
    } else {
      b.next = nb.next;
      if (b.next >= 0) blocks_[static_cast<size_t>(b.next)].prev = id;
    }
    b.size += nb.size;
    spare_.push_back(n);
  }
  insert_free(id);
}

void Timeline::free(int64_t charged, int64_t block) {
  if (cache_on_) cache_.free(block);
  free(charged);
}

void Timeline::free(int64_t charged) {
  current_ -= charged;
  if (g_trace) std::fprintf(stderr, "-%lld %lld\n", static_cast<long long>(charged), static_cast<long long>(current_));
}

int64_t Timeline::alloc(int64_t bytes) {
  if (bytes < 0) throw EstimateError("internal: negative allocation");
  int64_t charged = bytes;
  if (granularity_ > 1 && bytes > 0) {
    if (bytes > std::numeric_limits<int64_t>::max() - granularity_) {
      throw EstimateError("the job's tensors exceed 2^63 bytes");
    }
    charged = (bytes + granularity_ - 1) / granularity_ * granularity_;
  }
  if (charged > std::numeric_limits<int64_t>::max() / 2 - current_) {
    throw EstimateError("the job's memory exceeds 2^62 bytes");
  }
  current_ += charged;
  ++allocations_;
  if (cache_on_) {
    last_block_ = cache_.alloc(bytes);
    const int64_t r = cache_.reserved() + (shadow_on_ ? std::max<int64_t>(0, shadow_offset_) : 0);
    if (r > reserved_peak_) reserved_peak_ = r;
  }
  if (g_trace) std::fprintf(stderr, "+%lld %lld\n", static_cast<long long>(charged), static_cast<long long>(current_));
  if (current_ > peak_) peak_ = current_;
  if (shadow_on_ && current_ + shadow_offset_ > peak_) peak_ = current_ + shadow_offset_;
  return charged;
}

void Timeline::begin(const std::string& phase) {
  if (g_trace) std::fprintf(stderr, "phase %s\n", phase.c_str());
  phase_ = phase;
  phase_start_peak_ = peak_;
  peak_ = shadow_on_ ? std::max(current_, current_ + shadow_offset_) : current_;
}

void Timeline::end() {
  if (phase_.empty()) return;
  if (g_trace) std::fprintf(stderr, "end %s\n", phase_.c_str());
  int64_t& slot = phase_peaks_[phase_];
  slot = std::max(slot, peak_);
  peak_ = std::max(peak_, phase_start_peak_);
  phase_.clear();
}

Tensor Sim::empty(int64_t numel, int64_t esize) {
  if (numel < 0 || esize <= 0) throw EstimateError("internal: bad tensor size");
  if (numel > 0 && esize > std::numeric_limits<int64_t>::max() / numel) {
    throw EstimateError("a tensor of the job exceeds 2^63 bytes");
  }
  Tensor t;
  t.block = std::allocate_shared<Block>(std::pmr::polymorphic_allocator<Block>(&arena_), &timeline,
                                        timeline.alloc(numel * esize));
  t.numel = numel;
  t.esize = esize;
  return t;
}

Leaf* Sim::new_leaf(int64_t grad_esize, bool param) {
  leaves_.push_back(std::make_unique<Leaf>());
  leaves_.back()->grad_esize = grad_esize;
  leaves_.back()->param = param;
  return leaves_.back().get();
}

Node* Sim::record(const std::string& op, std::initializer_list<const Tensor*> inputs,
                  std::initializer_list<Tensor*> outputs, std::initializer_list<Tensor> saved, BackwardFn fn) {
  if (!grad_mode) return nullptr;
  bool any = false;
  for (const Tensor* t : inputs) any = any || (t != nullptr && t->requires_grad());
  if (!any) return nullptr;
  Node* node = &graphs_.back().emplace_back();
  node->seq = seq_++;
  node->next.reserve(inputs.size());
  for (const Tensor* t : inputs) node->next.push_back(t != nullptr ? t->edge : Edge{});
  node->buffer.resize(outputs.size());
  node->fn = std::move(fn);
  for (const Tensor& t : saved) {
    if (t.defined()) node->saved.push_back(t.detach());
  }
  Node* raw = node;
  int i = 0;
  for (Tensor* o : outputs) {
    if (o != nullptr) o->edge = Edge{raw, i, nullptr};
    ++i;
  }
  if (graphs_.size() == 1) {
    for (const Tensor& s : saved) {
      if (!s.defined() || s.block->kept) continue;
      s.block->kept = true;
      kept_.push_back({where_, op, s.block->charged});
    }
  }
  return raw;
}

// InputBuffer::add: the first gradient is kept as is; a second is added (accumulate()).
void Sim::add_into(Tensor& slot, Tensor g) {
  g.edge = Edge{};
  if (!slot.defined()) {
    slot = std::move(g);
  } else if (grad_buffer_in_place && slot.use_count() == 1 && slot.contiguous) {
    // 2.x: old_var.add_(var), the only holder of a dense buffer
  } else {
    Tensor sum = empty(slot.numel, slot.esize);  // old + new, both alive meanwhile
    slot = std::move(sum);
  }
}

// AccumulateGrad: steals a gradient nobody else holds into .grad, copies otherwise; later
// backward passes (gradient accumulation) add into .grad in place.
void Sim::accumulate_grad(Leaf& l) {
  Tensor g = std::move(l.buffer);
  l.buffer = Tensor{};
  if (!g.defined() || l.grad.defined()) return;  // in place: grad += new
  const bool steal = (g.use_count() == 1 || g.sole_view) && g.contiguous && g.esize == l.grad_esize;
  // The accumulation shadow moves before a copy is charged, so the later micro-batches'
  // view never counts the gradient twice.
  // A stolen view keeps its whole storage: that is what leaves the shadow.
  if (on_first_grad && l.param) on_first_grad(steal && g.sole_view ? g.block->charged : timeline.charge(g.numel * l.grad_esize));
  l.grad = steal ? g.detach() : empty(g.numel, l.grad_esize);
}

void Sim::delivered(Leaf& l) {
  if (l.pending > 0 && --l.pending == 0) accumulate_grad(l);
}

void Sim::accumulate(const Edge& e, Tensor g) {
  if (e.leaf != nullptr) {
    add_into(e.leaf->buffer, std::move(g));
    delivered(*e.leaf);
    return;
  }
  add_into(e.node->buffer[static_cast<size_t>(e.slot)], std::move(g));
}

// The engine's dependency count: every edge from a node reachable from the root into a
// leaf is one delivery its AccumulateGrad waits for.
void Sim::count_edges(const Tensor& root, std::deque<Node>& nodes) {
  std::set<const Node*> mine;
  for (Node& n : nodes) {
    n.live = false;
    mine.insert(&n);
  }
  std::vector<Node*> stack;
  auto visit = [&](const Edge& e) {
    if (e.leaf != nullptr) {
      ++e.leaf->pending;
    } else if (e.node != nullptr && mine.count(e.node) && !e.node->live) {
      e.node->live = true;
      stack.push_back(e.node);
    }
  };
  visit(root.edge);
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const Edge& e : n->next) visit(e);
  }
}

void Sim::run(std::deque<Node>& nodes) {
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    Node& n = *it;
    if (!n.live) continue;
    n.live = false;
    bool reached = false;
    for (const Tensor& g : n.buffer) reached = reached || g.defined();
    Grads out;
    if (reached && n.fn) {
      Grads in = std::move(n.buffer);
      n.buffer.clear();
      out = n.fn(in);
      in.clear();
      n.fn = nullptr;  // releases what the node saved
      n.saved.clear();
    }
    for (size_t i = 0; i < n.next.size(); ++i) {
      const Edge& e = n.next[i];
      if (i < out.size() && out[i].defined() && e.valid()) {
        Tensor g = std::move(out[i]);
        out[i] = Tensor{};
        accumulate(e, std::move(g));
      } else if (e.leaf != nullptr) {
        delivered(*e.leaf);  // nothing flowed, but the edge is done
      }
    }
  }
}

void Sim::backward(const Tensor& root, Tensor seed) {
  const bool saved_mode = grad_mode;
  grad_mode = false;
  // A checkpoint's backward is reentrant: a graph task of its own, with its own
  // dependency counts and input buffers. What the outer one holds (a tied embedding's
  // first gradient, waiting) stays put until the outer one goes on.
  std::vector<std::pair<int, Tensor>> outer;
  outer.reserve(leaves_.size());
  for (auto& l : leaves_) {
    outer.emplace_back(l->pending, std::move(l->buffer));
    l->pending = 0;
    l->buffer = Tensor{};
  }
  count_edges(root, graphs_.back());
  if (root.edge.valid()) accumulate(root.edge, std::move(seed));
  run(graphs_.back());
  // Leaves made during this backward (a checkpoint's recomputed inputs) had no outer state.
  for (size_t i = 0; i < leaves_.size(); ++i) {
    Leaf& l = *leaves_[i];
    if (l.buffer.defined()) accumulate_grad(l);  // every counted delivery was made
    l.pending = i < outer.size() ? outer[i].first : 0;
    l.buffer = i < outer.size() ? std::move(outer[i].second) : Tensor{};
  }
  grad_mode = saved_mode;
}

void Sim::push_graph() { graphs_.emplace_back(); }

void Sim::backward_nested(const Tensor& root, Tensor seed) {
  backward(root, std::move(seed));
  graphs_.pop_back();
}

void Sim::drop_graph() {
  graphs_.resize(1);
  graphs_[0].clear();
  held_.clear();
}

}  // namespace memfit::estimator::sim
