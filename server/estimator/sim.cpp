#include "sim.h"

#include <limits>

#include "estimator.h"

namespace memfit::estimator::sim {

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
  if (current_ > peak_) peak_ = current_;
  if (shadow_on_ && current_ + shadow_offset_ > peak_) peak_ = current_ + shadow_offset_;
  return charged;
}

void Timeline::begin(const std::string& phase) {
  phase_ = phase;
  phase_start_peak_ = peak_;
  peak_ = shadow_on_ ? std::max(current_, current_ + shadow_offset_) : current_;
}

void Timeline::end() {
  if (phase_.empty()) return;
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

void Sim::accumulate(const Edge& e, Tensor g) {
  if (e.leaf != nullptr) {
    Leaf& l = *e.leaf;
    if (!l.grad.defined()) {
      // AccumulateGrad steals a gradient nobody else holds; otherwise it copies.
      if (g.use_count() == 1 && g.contiguous && g.esize == l.grad_esize) {
        l.grad = g.detach();
      } else {
        l.grad = empty(g.numel, l.grad_esize);
      }
      if (on_first_grad && l.param) on_first_grad(l.grad.block->charged);
    }
    return;  // later gradients add in place
  }
  Tensor& slot = e.node->buffer[static_cast<size_t>(e.slot)];
  g.edge = Edge{};
  if (!slot.defined()) {
    slot = std::move(g);
  } else if (slot.use_count() == 1 && slot.contiguous) {
    // in place into the buffer's own tensor
  } else if (g.use_count() == 1 && g.contiguous) {
    slot = std::move(g);
  } else {
    Tensor sum = empty(slot.numel, slot.esize);
    slot = std::move(sum);
  }
}

void Sim::run(std::deque<Node>& nodes) {
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {
    Node& n = *it;
    bool reached = false;
    for (const Tensor& g : n.buffer) reached = reached || g.defined();
    if (!reached || !n.fn) continue;
    Grads in = std::move(n.buffer);
    n.buffer.clear();
    Grads out = n.fn(in);
    in.clear();
    n.fn = nullptr;  // releases what the node saved
    n.saved.clear();
    for (size_t i = 0; i < out.size() && i < n.next.size(); ++i) {
      if (out[i].defined() && n.next[i].valid()) {
        Tensor g = std::move(out[i]);
        out[i] = Tensor{};
        accumulate(n.next[i], std::move(g));
      }
    }
  }
}

void Sim::backward(const Tensor& root, Tensor seed) {
  const bool saved_mode = grad_mode;
  grad_mode = false;
  if (root.edge.valid()) accumulate(root.edge, std::move(seed));
  run(graphs_.back());
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
}

}  // namespace memfit::estimator::sim
