// What /metrics exports (server/daemon/metrics_view.h, metrics.h): label values users
// control, which finished jobs are kept, the per-device peak between scrapes, and the
// serialized text of a scrape. Pure functions and an explicit clock: no sleeps.
#include "metrics_view.h"

#include <gtest/gtest.h>
#include <prometheus/text_serializer.h>

#include <sstream>

#include "core.h"
#include "metrics.h"

namespace memfit::daemon {
namespace {

bool valid_utf8(const std::string& s) {
  // The same rules the exporter applies; a second, naive decoder for the test.
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

const std::string kFFFD = "\xEF\xBF\xBD";

TEST(LabelValue, PlainTextIsKept) {
  EXPECT_EQ(LabelValue("lora-gpt2 \"run\" \\ 1"), "lora-gpt2 \"run\" \\ 1");
  EXPECT_EQ(LabelValue("Ünïcødé ジョブ"), "Ünïcødé ジョブ");
  EXPECT_EQ(LabelValue(""), "");
}

TEST(LabelValue, ControlCharactersAndInvalidUtf8AreReplaced) {
  EXPECT_EQ(LabelValue("a\nb\tc\x7f"), "a" + kFFFD + "b" + kFFFD + "c" + kFFFD);
  EXPECT_EQ(LabelValue("x\xff\xfey"), "x" + kFFFD + kFFFD + "y");
  EXPECT_EQ(LabelValue("\xc0\xaf"), kFFFD + kFFFD);               // overlong '/'
  EXPECT_EQ(LabelValue("\xed\xa0\x80"), kFFFD + kFFFD + kFFFD);   // a surrogate
  EXPECT_EQ(LabelValue("ab\xe3\x82"), "ab" + kFFFD + kFFFD);      // cut sequence at the end
  EXPECT_TRUE(valid_utf8(LabelValue(std::string("\x80\xbf\xf5\xf8 ok \xe2\x82\xac", 12))));
}

TEST(LabelValue, CappedAtACharacterBoundary) {
  EXPECT_EQ(LabelValue(std::string(1000, 'n')).size(), kMaxLabelBytes);
  std::string yen;
  for (int i = 0; i < 100; ++i) yen += "¥";  // 2 bytes each
  EXPECT_EQ(LabelValue(yen).size(), kMaxLabelBytes);
  std::string kana;
  for (int i = 0; i < 100; ++i) kana += "ジ";  // 3 bytes each: 42 fit in 128
  const std::string v = LabelValue(kana);
  EXPECT_EQ(v.size(), 126u);
  EXPECT_TRUE(valid_utf8(v));
  EXPECT_EQ(LabelValue("abcdef", 4), "abcd");
}

v1::Job Job(const std::string& id) {
  v1::Job j;
  j.set_id(id);
  j.set_owner("alice");
  j.set_name("first run");
  j.set_state(v1::RUNNING);
  j.set_device("cpu:0");
  j.mutable_spec()->mutable_model()->set_architecture("gpt2");
  j.mutable_plan()->set_estimated_peak_bytes(100);
  j.mutable_plan()->set_reserved_bytes(120);
  j.mutable_plan()->set_activation_bytes(30);
  j.mutable_plan()->set_exact_activation_bytes(70);
  j.mutable_progress()->set_peak_memory_bytes(90);
  j.mutable_progress()->set_step(3);
  j.mutable_progress()->set_total_steps(10);
  j.mutable_progress()->set_loss(2.5);
  return j;
}

TEST(GaugeOf, LabelsFromTheJob) {
  v1::Job j = Job("j1");
  JobSeries g = GaugeOf(j);
  EXPECT_EQ(g.id, "j1");
  EXPECT_EQ(g.state, "running");
  EXPECT_EQ(g.model, "gpt2");
  EXPECT_EQ(g.method, "lora");   // the spec's default
  EXPECT_EQ(g.preset, "custom");  // empty
  EXPECT_EQ(g.estimated, 100);
  EXPECT_EQ(g.reserved, 120);
  EXPECT_EQ(g.measured_peak, 90);
  EXPECT_EQ(g.activation_bytes, 30);  // no measurement yet: the plan's
  EXPECT_EQ(g.activation_saved, 40);
  EXPECT_EQ(g.step, 3);
  j.mutable_spec()->mutable_method()->set_kind("head_only");
  j.mutable_spec()->mutable_memory()->set_preset("memfit_best");
  j.mutable_progress()->set_activation_bytes(25);
  j.set_state(v1::CANCELLED);
  g = GaugeOf(j);
  EXPECT_EQ(g.method, "head_only");
  EXPECT_EQ(g.preset, "memfit_best");
  EXPECT_EQ(g.activation_bytes, 25);
  EXPECT_EQ(g.state, "cancelled");
  j.mutable_plan()->set_level("approx+checkpointing");  // memfitd picked (memory.preset: auto)
  EXPECT_EQ(GaugeOf(j).preset, "auto");
  j.set_name(std::string(300, 'x') + "\n");
  j.set_owner("bob\xff");
  g = GaugeOf(j);
  EXPECT_EQ(g.name.size(), kMaxLabelBytes);
  EXPECT_EQ(g.owner, "bob" + kFFFD);
}

TEST(StateLabel, Names) {
  EXPECT_EQ(StateLabel(v1::SUCCEEDED), "succeeded");
  EXPECT_EQ(StateLabel(v1::CANCELLING), "cancelling");
  EXPECT_EQ(StateLabel(static_cast<v1::JobState>(99)), "unknown");
}

TEST(ChooseFinished, KeptForTheRetentionThenDropped) {
  const std::map<std::string, int64_t> t{{"a", 1000}, {"b", 5000}, {"c", 9000}};
  // A 13 s job that ended at 9 s is seen by every scrape in the next 600 s.
  auto c = ChooseFinished(t, 9000, 600'000, 100);
  EXPECT_EQ(c.keep, (std::vector<std::string>{"c", "b", "a"}));  // newest first
  EXPECT_TRUE(c.drop.empty());
  c = ChooseFinished(t, 601'000, 600'000, 100);  // a: exactly 600 s old
  EXPECT_EQ(c.keep, (std::vector<std::string>{"c", "b"}));
  EXPECT_EQ(c.drop, (std::vector<std::string>{"a"}));
  c = ChooseFinished(t, 10'000'000, 600'000, 100);
  EXPECT_TRUE(c.keep.empty());
  EXPECT_EQ(c.drop.size(), 3u);
}

TEST(ChooseFinished, RetentionZeroKeepsNothing) {
  const auto c = ChooseFinished({{"a", 1000}}, 1000, 0, 100);
  EXPECT_TRUE(c.keep.empty());
  EXPECT_EQ(c.drop, (std::vector<std::string>{"a"}));
}

TEST(ChooseFinished, CapKeepsTheMostRecentlyFinished) {
  const std::map<std::string, int64_t> t{{"a", 1000}, {"b", 3000}, {"c", 2000}, {"d", 3000}};
  const auto c = ChooseFinished(t, 4000, 600'000, 2);
  EXPECT_EQ(c.keep, (std::vector<std::string>{"b", "d"}));  // same time: by id
  EXPECT_EQ(c.drop, (std::vector<std::string>{"c", "a"}));
}

TEST(ChooseFinished, AClockThatWentBackCountsAsNew) {
  const auto c = ChooseFinished({{"a", 50'000}}, 1000, 10'000, 10);
  EXPECT_EQ(c.keep, (std::vector<std::string>{"a"}));
}

TEST(PeakWindow, HighestSampleBetweenScrapesThenReset) {
  PeakWindow w;
  EXPECT_EQ(w.take("cpu:0", 5), 5);  // nothing observed: the value now
  w.observe("cpu:0", 100);
  w.observe("cpu:0", 400);  // a job's peak between scrapes
  w.observe("cpu:0", 50);
  w.observe("cpu:1", 7);
  EXPECT_EQ(w.take("cpu:0", 60), 400);
  EXPECT_EQ(w.take("cpu:0", 60), 60);  // a new window
  EXPECT_EQ(w.take("cpu:1", 0), 7);
  w.observe("cpu:0", 10);
  EXPECT_EQ(w.take("cpu:0", 30), 30);  // at least the value at the scrape
  EXPECT_EQ(w.take("cpu:2", -1), 0);
}

// The text of a scrape with hostile labels: the exposition stays one series per line,
// the values escaped and capped; every family has HELP and TYPE.
TEST(MetricFamilies, HostileLabelsCannotBreakTheExposition) {
  Snapshot s;
  s.devices.push_back({"cpu:0", "cpu", 1000, 120, 50, 400});
  v1::Job j = Job("j1");
  j.set_name("a\"b\\c} evil=\"x\"\n# TYPE fake gauge\n" + std::string(500, 'z'));
  s.jobs.push_back(GaugeOf(j));
  v1::Job k = Job("j2");
  k.set_state(v1::SUCCEEDED);
  s.jobs.push_back(GaugeOf(k));
  s.jobs_by_state[v1::RUNNING] = 1;
  s.estimate_ratios = {1.01};
  MetricFamilies f;
  const std::string text = prometheus::TextSerializer().Serialize(f.build(s));
  std::istringstream in(text);
  std::string line;
  int info = 0, fake = 0;
  while (std::getline(in, line)) {
    if (line.rfind("memfit_job_info{", 0) == 0) {
      ++info;
      EXPECT_NE(line.find("model=\"gpt2\""), std::string::npos) << line;
      EXPECT_NE(line.find("method=\"lora\""), std::string::npos) << line;
      EXPECT_NE(line.find("preset=\"custom\""), std::string::npos) << line;
      EXPECT_LT(line.size(), 600u);  // the name was capped
    }
    fake += line.rfind("# TYPE fake", 0) == 0;
    if (line.rfind("memfit_job_reserved_bytes{", 0) == 0) {
      EXPECT_NE(line.find("job_id=\""), std::string::npos) << line;
      EXPECT_EQ(line.find("job=\""), std::string::npos) << line;
      EXPECT_NE(line.find("state=\""), std::string::npos) << line;
    }
  }
  EXPECT_EQ(info, 2);
  EXPECT_EQ(fake, 0);
  // Quotes and backslashes escaped by the serializer; the newline was replaced before.
  EXPECT_NE(text.find("name=\"a\\\"b\\\\c} evil=\\\"x\\\"" + kFFFD + "# TYPE fake gauge" + kFFFD + "zzz"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("memfit_device_memory_peak_bytes{device=\"cpu:0\",kind=\"cpu\"} 400"), std::string::npos) << text;
  EXPECT_NE(text.find("memfit_job_measured_peak_bytes{job_id=\"j2\",owner=\"alice\",device=\"cpu:0\",state=\"succeeded\"} 90"),
            std::string::npos)
      << text;
  for (const auto& fam : f.build(s)) {
    EXPECT_NE(text.find("# HELP " + fam.name + " "), std::string::npos) << fam.name;
    EXPECT_NE(text.find("# TYPE " + fam.name + " "), std::string::npos) << fam.name;
  }
}

TEST(MetricFamilies, TheSerializerEscapesNewlines) {
  // A value that reached the exporter unsanitized still stays on its line.
  Snapshot s;
  JobSeries raw;
  raw.id = "j1";
  raw.name = "x\ny";
  s.jobs.push_back(raw);
  MetricFamilies f;
  const std::string text = prometheus::TextSerializer().Serialize(f.build(s));
  EXPECT_NE(text.find("name=\"x\\ny\""), std::string::npos) << text;
}

TEST(MetricFamilies, HistogramsAddUpOverScrapes) {
  MetricFamilies f;
  Snapshot s;
  s.estimate_ratios = {0.9, 1.3};
  f.build(s);
  s.estimate_ratios = {1.0};
  for (const auto& fam : f.build(s)) {
    if (fam.name != "memfit_estimate_error_ratio") continue;
    EXPECT_EQ(fam.metric.at(0).histogram.sample_count, 3u);
  }
}

}  // namespace
}  // namespace memfit::daemon
