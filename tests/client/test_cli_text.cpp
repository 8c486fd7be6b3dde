// The CLI without a daemon: printable() (nothing from memfitd reaches a terminal with a
// control character in it), the tables built on it, and the command line's definition
// (cli.cpp): verbs, help, checks on flag values and their exit codes and messages.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cli.h"
#include "remote.h"
#include "text.h"

namespace memfit::cli {
namespace {

bool has_control(const std::string& s) {
  for (unsigned char c : s) {
    if (c < 0x20 && c != '\n') return true;
    if (c == 0x7F) return true;
  }
  // C1 controls as UTF-8 (U+0080..U+009F) or as raw bytes
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    if (static_cast<unsigned char>(s[i]) == 0xC2 && static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
        static_cast<unsigned char>(s[i + 1]) <= 0x9F) {
      return true;
    }
  }
  return false;
}

TEST(Printable, EscapesAnsiColour) {
  const std::string red = "\x1b[31mred";
  const std::string out = printable(red);
  EXPECT_EQ(out.find('\x1b'), std::string::npos);
  EXPECT_EQ(out, "\\x1b[31mred");
}

TEST(Printable, PrintsNoEscByteToAStream) {
  testing::internal::CaptureStdout();
  std::printf("%s\n", printable("\x1b[31mred").c_str());
  std::fflush(stdout);
  const std::string printed = testing::internal::GetCapturedStdout();
  EXPECT_EQ(printed.find('\x1b'), std::string::npos);
  EXPECT_NE(printed.find("red"), std::string::npos);
}

TEST(Printable, EscapesEveryC0ControlAndDel) {
  for (int c = 0; c < 0x20; ++c) {
    const std::string out = printable(std::string("a") + static_cast<char>(c) + "b");
    EXPECT_FALSE(has_control(out)) << c;
    EXPECT_EQ(out.front(), 'a');
    EXPECT_EQ(out.back(), 'b');
  }
  EXPECT_EQ(printable("\x7f"), "\\x7f");
  EXPECT_EQ(printable("a\nb\tc\rd"), "a\\nb\\tc\\rd");
  EXPECT_EQ(printable(std::string("nul\0byte", 8)), "nul\\x00byte");
  EXPECT_EQ(printable("\x1b]0;title\x07"), "\\x1b]0;title\\x07");  // no terminal retitling
}

TEST(Printable, EscapesC1ControlsAndBidiOverrides) {
  EXPECT_EQ(printable("\xc2\x9b" "31m"), "\\u009b31m");        // CSI as a code point
  EXPECT_EQ(printable("\x9b" "31m"), "\\x9b31m");              // CSI as a raw byte (not UTF-8)
  EXPECT_EQ(printable("a\xe2\x80\xae" "b"), "a\\u202eb");       // right-to-left override
  EXPECT_EQ(printable("a\xe2\x80\xa8" "b"), "a\\u2028b");       // line separator
}

TEST(Printable, KeepsTextAndValidUtf8) {
  EXPECT_EQ(printable("gpt2-lora j0001 / 85.1 MiB"), "gpt2-lora j0001 / 85.1 MiB");
  EXPECT_EQ(printable("caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x9a\x80"), "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x9a\x80");
  EXPECT_EQ(printable("back\\slash"), "back\\slash");
}

TEST(Printable, EscapesInvalidUtf8) {
  EXPECT_EQ(printable("\xc3"), "\\xc3");                       // cut short
  EXPECT_EQ(printable("\xc0\xaf"), "\\xc0\\xaf");               // overlong '/'
  EXPECT_EQ(printable("\xed\xa0\x80"), "\\xed\\xa0\\x80");      // a surrogate
  EXPECT_EQ(printable("\xff\xfe"), "\\xff\\xfe");
}

TEST(Printable, LinesKeepLineFeedsAndTabs) {
  EXPECT_EQ(printable_lines("a\tb\nc\x1b[2Jd\r\n"), "a\tb\nc\\x1b[2Jd\\r\n");
}

TEST(Printable, Utf8CompletePrefixHoldsBackACutSequence) {
  EXPECT_EQ(utf8_complete_prefix("abc"), 3u);
  EXPECT_EQ(utf8_complete_prefix("ab\xe6\x97"), 2u);          // 3-byte sequence, 2 present
  EXPECT_EQ(utf8_complete_prefix("ab\xe6\x97\xa5"), 5u);
  EXPECT_EQ(utf8_complete_prefix("ab\xf0"), 2u);
  EXPECT_EQ(utf8_complete_prefix("ab\x80"), 3u);              // a stray continuation: no lead
}

TEST(Table, CellsAreEscapedAndAligned) {
  const std::string t = table({"JOB", "NAME", "STATE"}, {{"j1", "\x1b[31mred", "running"}, {"j2", "caf\xc3\xa9", "queued"}});
  EXPECT_EQ(t.find('\x1b'), std::string::npos);
  EXPECT_FALSE(has_control(t));
  EXPECT_NE(t.find("\\x1b[31mred"), std::string::npos);
  // the STATE column starts at the same terminal column on every line (é is one column)
  EXPECT_EQ(t, "JOB  NAME         STATE\n"
               "j1   \\x1b[31mred  running\n"
               "j2   caf\xc3\xa9         queued\n");
}

TEST(Yaml, ControlCharactersAreEscaped) {
  const std::string y = json_to_yaml(R"({"name": "\u001b[31mred\u0007\u009b\u202eevil", "ok": "plain", "u": "caf\u00e9"})");
  EXPECT_FALSE(has_control(y)) << y;
  EXPECT_EQ(y.find("\xe2\x80\xae"), std::string::npos) << y;  // U+202E escaped too
  EXPECT_NE(y.find("ok: plain"), std::string::npos);
  EXPECT_NE(y.find("u: caf\xc3\xa9"), std::string::npos) << y;  // plain text stays as it is
  EXPECT_EQ(YAML::Load(y)["name"].as<std::string>(), "\x1b[31mred\x07\xc2\x9b\xe2\x80\xae" "evil");
}

// ---- the command line (cli.cpp) ----

Parsed p(std::vector<std::string> args) { return parse(args); }

TEST(CommandLine, NoArgumentsPrintsUsageAndExits2) {
  const Parsed r = p({});
  EXPECT_FALSE(r.run);
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_EQ(r.out.rfind("usage: memfit", 0), 0u);
}

TEST(CommandLine, HelpOnEveryVerb) {
  for (const char* verb : {"submit", "get", "list", "cancel", "watch", "events", "logs", "devices", "estimate"}) {
    for (const char* flag : {"--help", "-h"}) {
      const Parsed r = p({verb, flag});
      EXPECT_FALSE(r.run) << verb;
      EXPECT_EQ(r.code, 0) << verb;
      EXPECT_EQ(r.out.rfind(std::string("usage: memfit ") + verb, 0), 0u) << r.out;
      EXPECT_NE(r.out.find(std::string("example: memfit ") + verb), std::string::npos) << r.out;
      EXPECT_NE(r.out.find("MEMFIT_SERVER"), std::string::npos) << r.out;
    }
    // `memfit help VERB` says the same
    EXPECT_EQ(p({"help", verb}).out, p({verb, "--help"}).out);
  }
  const Parsed top = p({"--help"});
  EXPECT_EQ(top.code, 0);
  for (const char* verb : {"submit", "watch", "devices", "estimate"}) {
    EXPECT_NE(top.out.find(std::string("  ") + verb), std::string::npos);
  }
  EXPECT_EQ(p({"help"}).out, top.out);
}

TEST(CommandLine, HelpWinsOverOtherErrors) {
  const Parsed r = p({"list", "--state", "sleeping", "--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.out.rfind("usage: memfit list", 0), 0u);
  EXPECT_EQ(p({"get", "--help"}).code, 0);  // JOB not needed for help
}

TEST(CommandLine, HelpListsTheFlags) {
  const std::string h = p({"list", "--help"}).out;
  EXPECT_EQ(h.rfind("usage: memfit list [--state S]... [--all-users | --owner USER] [--limit N]\n"
                    "                   [-o table|json]\n",
                    0),
            0u)
      << h;
  EXPECT_NE(h.find("  -o, --output table|json  "), std::string::npos) << h;
  EXPECT_NE(h.find("  -s, --server HOST:PORT"), std::string::npos) << h;
  EXPECT_NE(h.find("  --tls-ca FILE"), std::string::npos) << h;
  const std::string s = p({"submit", "--help"}).out;
  EXPECT_EQ(s.rfind("usage: memfit submit -f SPEC [--watch]", 0), 0u) << s;
}

void expect_usage_error(std::vector<std::string> args, const std::string& needle) {
  const Parsed r = p(args);
  EXPECT_FALSE(r.run) << args[0];
  EXPECT_EQ(r.code, kExitBadInput) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
}

TEST(CommandLine, UsageErrorsExit2AndNameTheFlag) {
  expect_usage_error({"get"}, "memfit get: JOB is required\n");
  expect_usage_error({"submit"}, "memfit submit: -f SPEC is required\n");
  expect_usage_error({"estimate"}, "memfit estimate: -f SPEC is required\n");
  expect_usage_error({"list", "--state", "sleeping"},
                     "memfit list: --state: expected queued, running, cancelling, succeeded, failed or cancelled, got "
                     "'sleeping'");
  expect_usage_error({"list", "--limit", "0"}, "--limit: expected a positive number, got '0'");
  expect_usage_error({"list", "--all-users", "--owner", "bob"}, "--all-users");
  expect_usage_error({"list", "-o", "yaml"}, "-o: expected table or json, got 'yaml'");
  expect_usage_error({"get", "j1", "-o", "xml"}, "-o: expected table, json or yaml, got 'xml'");
  expect_usage_error({"submit", "-f", "x.yaml", "--priority", "5000"}, "--priority: expected -1000..1000, got '5000'");
  expect_usage_error({"submit", "-f", "x.yaml", "--priority", "high"}, "--priority: expected -1000..1000");
  expect_usage_error({"submit", "-f"}, "-f");
  expect_usage_error({"get", "j1", "j2"}, "memfit get: unexpected argument 'j2'");
  expect_usage_error({"get", "j1", "--frob"}, "memfit get: unknown option '--frob'");
  expect_usage_error({"devices", "extra"}, "unexpected argument 'extra'");
  expect_usage_error({"estimate", "-f", "x", "-o", "yaml"}, "memfit estimate: -o: expected json or text, got 'yaml'");
  expect_usage_error({"estimate", "-f", "x", "--device", "tpu"}, "--device: expected cpu or cuda");
  expect_usage_error({"estimate", "-f", "x", "--device-memory", "16 gigs"}, "--device-memory: '16 gigs' is not a size");
  expect_usage_error({"estimate", "-f", "x", "--cuda-context", "lots"}, "--cuda-context: 'lots' is not a size");
  expect_usage_error({"estimate", "-f", "x", "--reserved-overhead", "-1"}, "--reserved-overhead: expected a fraction");
  expect_usage_error({"estimate", "-f", "x", "--threads", "0"}, "--threads: expected 1..65536");
  const Parsed unknown = p({"frobnicate"});
  EXPECT_EQ(unknown.code, kExitBadInput);
  EXPECT_EQ(unknown.err.rfind("memfit: unknown command 'frobnicate'\n", 0), 0u) << unknown.err;
  expect_usage_error({"help", "frobnicate"}, "unknown command 'frobnicate'");
  expect_usage_error({"--frob"}, "memfit: unknown option '--frob'");
}

TEST(CommandLine, ParsesEveryVerbsFlags) {
  Parsed r = p({"submit", "--file", "job.yaml", "-w", "--priority", "-5", "--request-id", "r1", "-o", "json",
                "--server", "h:1", "--token", "t"});
  ASSERT_TRUE(r.run) << r.err;
  EXPECT_EQ(r.invocation.verb, "submit");
  EXPECT_EQ(r.invocation.submit.file, "job.yaml");
  EXPECT_TRUE(r.invocation.submit.watch);
  EXPECT_EQ(r.invocation.submit.priority, -5);
  EXPECT_EQ(r.invocation.submit.request_id, "r1");
  EXPECT_EQ(r.invocation.common.output, Output::kJson);
  EXPECT_EQ(r.invocation.common.server, "h:1");
  EXPECT_EQ(r.invocation.common.token, "t");

  r = p({"list", "--state", "RUNNING", "--state", "queued", "--limit", "7", "--owner", "bob"});
  ASSERT_TRUE(r.run) << r.err;
  EXPECT_EQ(r.invocation.list.states, (std::vector<std::string>{"running", "queued"}));
  EXPECT_EQ(r.invocation.list.limit, 7);
  EXPECT_EQ(r.invocation.list.owner, "bob");
  EXPECT_EQ(r.invocation.common.output, Output::kTable);

  r = p({"get", "j1", "-o", "yaml"});
  ASSERT_TRUE(r.run) << r.err;
  EXPECT_EQ(r.invocation.job, "j1");
  EXPECT_EQ(r.invocation.common.output, Output::kYaml);
  EXPECT_EQ(p({"events", "j1", "-o", "text"}).invocation.common.output, Output::kTable);

  r = p({"cancel", "--", "-j1"});  // after "--", an argument even if it looks like a flag
  ASSERT_TRUE(r.run) << r.err;
  EXPECT_EQ(r.invocation.job, "-j1");
  expect_usage_error({"cancel", "--", "j1", "j2"}, "unexpected argument 'j2'");

  r = p({"logs", "j1", "--stderr", "-f"});
  ASSERT_TRUE(r.run) << r.err;
  EXPECT_TRUE(r.invocation.logs.stderr_stream);
  EXPECT_TRUE(r.invocation.logs.follow);
  EXPECT_FALSE(r.invocation.logs.raw);

  r = p({"estimate", "-f", "s.yaml", "--device-memory", "16GiB", "--device", "cuda:0", "--threads", "4",
         "--cuda-context", "1GiB", "--reserved-overhead", "0.1", "-o", "json"});
  ASSERT_TRUE(r.run) << r.err;
  const EstimateArgs& e = r.invocation.estimate;
  EXPECT_EQ(e.spec, "s.yaml");
  EXPECT_EQ(e.device_memory, int64_t{16} << 30);
  EXPECT_EQ(e.device, "cuda:0");
  EXPECT_EQ(e.threads, 4);
  EXPECT_EQ(e.cuda_context, int64_t{1} << 30);
  EXPECT_DOUBLE_EQ(e.reserved_overhead, 0.1);
  EXPECT_TRUE(e.json_out);
  EXPECT_FALSE(e.remote);
  EXPECT_TRUE(p({"estimate", "-f", "s.yaml", "--server", "h:1"}).invocation.estimate.remote);
}

TEST(CommandLine, ConnectionFromTheEnvironmentUnlessFlagged) {
  setenv("MEMFIT_SERVER", "envhost:9", 1);
  setenv("MEMFIT_TOKEN", "envtoken", 1);
  Parsed r = p({"devices"});
  EXPECT_EQ(r.invocation.common.server, "envhost:9");
  EXPECT_EQ(r.invocation.common.token, "envtoken");
  r = p({"devices", "-s", "flag:1", "--token", "flagtoken"});
  EXPECT_EQ(r.invocation.common.server, "flag:1");
  EXPECT_EQ(r.invocation.common.token, "flagtoken");
  // the environment alone does not send `estimate` to memfitd
  EXPECT_FALSE(p({"estimate", "-f", "s.yaml"}).invocation.estimate.remote);
  unsetenv("MEMFIT_SERVER");
  unsetenv("MEMFIT_TOKEN");
  EXPECT_EQ(p({"devices"}).invocation.common.server, "127.0.0.1:7540");
}

}  // namespace
}  // namespace memfit::cli
