// How much of a device's compute each kind of job uses, learned from the throughput the
// workers report every step (tokens or samples per second) alone and beside other jobs.
// Pure and free of clocks: memfitd feeds it from worker events (core.cpp), the scheduler
// reads compute() for QueuedJob::compute, ListDevices and /metrics show what it learned.
//
//   ComputeModel m;
//   m.observe(kind, 1200.0, /*jobs_on_device=*/1);   // alone: 1200 tokens/s
//   m.observe(kind, 800.0, /*jobs_on_device=*/2);    // beside one other job: 800
//   m.stats(kind)->slowdown();                       // 1.5
//   m.compute(kind);                                  // 0.75 of a device
//
// The model: jobs on one device share its compute (processor sharing), so a job that uses
// a fraction u of the device alone and shares it with n - 1 similar jobs runs at
// min(1, 1 / (n u)) of its solo speed. The slowdown s = solo rate / shared rate then gives
// u = s / n when s > 1, and u <= 1 / n when it does not slow down at all.
//
// A kind not learned yet borrows from its family: kinds are named "<family>|<B>x<L>"
// (micro-batch B of length L; memfitd's ComputeKindOf). A step's work has a part linear
// in B x L (the projections, the MLP) and one in B x L^2 (attention), plus a fixed part
// (launches, the optimizer), so a kind with B' x L' does at most r = (B' L' / B L) x
// max(1, L' / L) times the work of one with B x L, and its share is taken to grow no faster
// than its work: a learned member with share u bounds the new kind's by u x max(1, r) (at
// most 1). The bound comes from the member nearest in shape (|log B'/B| + |log L'/L|; ties:
// the larger bound), not the smallest over the family, since each learned share is a
// noisy mean. A kind with no learned family member uses a whole device (1), so that
// placement spreads it. Both fallbacks err towards less packing.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace memfit::sched {

class ComputeModel {
 public:
  struct Stats {
    int64_t solo_steps = 0, shared_steps = 0;
    double solo_rate = 0, shared_rate = 0;  // running means (the last ~20 steps weigh most)
    double shared_jobs = 0;                 // mean jobs on the device, itself included, when shared
    int64_t last_use = 0;                   // the model's clock of observations (eviction)
    // solo rate / shared rate; 0 while either is unknown.
    double slowdown() const;
    // The fraction of a device the kind uses alone, in [kMinCompute, 1]; 1 while unknown.
    double compute() const;
  };
  static constexpr double kMinCompute = 0.05;
  static constexpr size_t kMaxKinds = 1024;  // the least recently seen kind goes first
  static constexpr int64_t kMinSteps = 3;    // each side, before a slowdown is believed

  // One step's throughput of a job of `kind`: `rate` units per second (tokens for language
  // models, samples for classifiers) while `jobs_on_device` jobs, itself included, ran on
  // its device. Ignored: an empty kind, a rate that is not positive and finite, fewer than
  // one job.
  void observe(const std::string& kind, double rate, int jobs_on_device);
  // What was learned of `kind` before (memfitd keeps kinds() in its store across restarts),
  // as the most recently seen kind. Ignored: an empty kind, negative step counts, rates or
  // a job count that are not finite and non-negative, shared_jobs below 1 with shared steps.
  void restore(const std::string& kind, const Stats& stats);
  // QueuedJob::compute for a job of `kind`: what was learned of it, else the bound from its
  // family, else 1 (a whole device).
  double compute(const std::string& kind) const;
  std::optional<Stats> stats(const std::string& kind) const;
  const std::map<std::string, Stats>& kinds() const { return kinds_; }

 private:
  Stats& slot(const std::string& kind);  // the kind's stats, made (evicting the oldest) if new
  std::map<std::string, Stats> kinds_;
  int64_t clock_ = 0;
};

struct KindShape {
  std::string family;
  double batch = 0, length = 0;
};
// "<family>|<B>x<L>" -> {family, B, L}; nullopt for a kind not named so.
std::optional<KindShape> SplitComputeKind(const std::string& kind);

}  // namespace memfit::sched
