// The CLI without a daemon: printable() (nothing from memfitd reaches a terminal with a
// control character in it), the tables built on it, and the command line's definition
// (cli.cpp): verbs, help, checks on flag values and their exit codes and messages.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "args.h"
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
  EXPECT_EQ(unknown.err, "memfit: unknown command 'frobnicate' (memfit --help lists them)\n");
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

// ---- "did you mean", addresses, --tail, version, completion (args.h, cli.cpp) ----

TEST(DidYouMean, EditDistanceCountsASwapAsOne) {
  EXPECT_EQ(edit_distance("sumbit", "submit"), 1u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("list", "list"), 0u);
  EXPECT_EQ(edit_distance("lst", "list"), 1u);
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
}

TEST(DidYouMean, ClosestNameOrNone) {
  const std::vector<std::string> verbs = {"submit", "get", "list", "cancel", "watch", "events", "logs", "devices"};
  EXPECT_EQ(closest("sumbit", verbs), "submit");
  EXPECT_EQ(closest("lsit", verbs), "list");
  EXPECT_EQ(closest("gte", verbs), "get");
  EXPECT_EQ(closest("devcies", verbs), "devices");
  EXPECT_EQ(closest("sub", verbs), "submit");   // a prefix of one name
  EXPECT_EQ(closest("frobnicate", verbs), "");
  EXPECT_EQ(closest("x", verbs), "");
  const std::vector<std::string> flags = {"--state", "--all-users", "--owner", "--limit", "-o", "--output"};
  EXPECT_EQ(closest("--stat", flags), "--state");
  EXPECT_EQ(closest("--limt", flags), "--limit");
  EXPECT_EQ(closest("-x", flags), "");  // one letter changed of one: no typo
  EXPECT_EQ(closest("--", flags), "");
}

TEST(DidYouMean, OneLineWithTheSuggestion) {
  Parsed r = p({"sumbit"});
  EXPECT_FALSE(r.run);
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_EQ(r.err, "memfit: unknown command 'sumbit'; did you mean 'submit'?\n");
  EXPECT_EQ(r.out, "");  // not the whole usage
  r = p({"list", "--stat", "running"});
  EXPECT_EQ(r.code, kExitBadInput);
  EXPECT_EQ(r.err, "memfit list: unknown option '--stat'; did you mean '--state'?\n");
  r = p({"logs", "j1", "--folow"});
  EXPECT_EQ(r.err, "memfit logs: unknown option '--folow'; did you mean '--follow'?\n");
  r = p({"submit", "-f", "x.yaml", "--priorty=3"});
  EXPECT_EQ(r.err, "memfit submit: unknown option '--priorty=3'; did you mean '--priority'?\n");
  r = p({"help", "wacth"});
  EXPECT_EQ(r.err, "memfit: unknown command 'wacth'; did you mean 'watch'?\n");
  r = p({"get", "j1", "--frob"});
  EXPECT_EQ(r.err, "memfit get: unknown option '--frob' (memfit get --help lists them)\n");
}

TEST(ServerAddress, AcceptedForms) {
  EXPECT_EQ(server_target("127.0.0.1"), "127.0.0.1:7540");
  EXPECT_EQ(server_target("gpu-box.example.com"), "gpu-box.example.com:7540");
  EXPECT_EQ(server_target("host:9000"), "host:9000");
  EXPECT_EQ(server_target("[::1]:9000"), "[::1]:9000");
  EXPECT_EQ(server_target("[::1]"), "[::1]:7540");
  EXPECT_EQ(server_target("::1"), "[::1]:7540");
  EXPECT_EQ(server_target("[fe80::1%eth0]:7"), "[fe80::1%eth0]:7");
  EXPECT_EQ(server_target("grpc://host"), "host:7540");
  EXPECT_EQ(server_target("grpc://host:1234"), "host:1234");
  EXPECT_EQ(server_target("grpc://[::1]:1234/"), "[::1]:1234");
  EXPECT_EQ(server_target("dns:///host:1234"), "dns:///host:1234");
  EXPECT_EQ(server_target("dns:///host"), "dns:///host:7540");
}

TEST(ServerAddress, AnythingElseNamesTheValue) {
  for (const std::string bad : {"http://host:7540", "https://host", "host:0", "host:65536", "host:http", "",
                                "host/path", "grpc://", "dns://8.8.8.8/host:1", "unix:/tmp/s", "[::1", "[::1]x",
                                "a b", "host:"}) {
    try {
      server_target(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("got '" + bad + "'"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("grpc://host[:port]"), std::string::npos) << e.what();
    }
  }
}

TEST(ServerAddress, FlagsAndEnvironmentAreNormalisedOrRefused) {
  EXPECT_EQ(p({"devices", "--server", "10.0.0.5"}).invocation.common.server, "10.0.0.5:7540");
  EXPECT_EQ(p({"devices", "-s", "grpc://box:1"}).invocation.common.server, "box:1");
  expect_usage_error({"devices", "--server", "http://box:7540"},
                     "memfit devices: --server: expected host, host:port, [v6]:port, grpc://host[:port] or "
                     "dns:///host[:port], got 'http://box:7540'");
  setenv("MEMFIT_SERVER", "http://box", 1);
  expect_usage_error({"list"}, "memfit list: MEMFIT_SERVER: expected host");
  // estimate without a connection flag does not use the environment: nothing to check
  EXPECT_TRUE(p({"estimate", "-f", "s.yaml"}).run);
  setenv("MEMFIT_SERVER", "127.0.0.1", 1);
  EXPECT_EQ(p({"list"}).invocation.common.server, "127.0.0.1:7540");
  unsetenv("MEMFIT_SERVER");
}

TEST(Tail, WhereTheLastLinesBegin) {
  EXPECT_EQ(tail_start("a\nb\nc\n", 2, true), 2u);
  EXPECT_EQ(tail_start("a\nb\nc", 2, true), 2u);      // an unfinished last line counts
  EXPECT_EQ(tail_start("a\nb\nc\n", 3, true), 0u);
  EXPECT_EQ(tail_start("a\nb\nc\n", 10, true), 0u);  // fewer lines than asked: all
  EXPECT_EQ(tail_start("a\nb\nc\n", 0, true), 6u);   // none
  EXPECT_EQ(tail_start("b\nc\n", 3, false), std::string_view::npos);  // read further back
  EXPECT_EQ(tail_start("x\nb\nc\n", 2, false), 2u);
  EXPECT_EQ(tail_start("", 1, true), 0u);
}

TEST(Tail, ParsedForWatchAndLogs) {
  EXPECT_EQ(p({"watch", "j1"}).invocation.watch.tail, kTailDefault);
  EXPECT_EQ(p({"watch", "j1", "--tail", "5"}).invocation.watch.tail, 5);
  EXPECT_EQ(p({"watch", "j1", "--tail", "all"}).invocation.watch.tail, kTailAll);
  EXPECT_EQ(p({"logs", "j1"}).invocation.logs.tail, kTailAll);
  EXPECT_EQ(p({"logs", "j1", "--tail", "0", "-f"}).invocation.logs.tail, 0);
  expect_usage_error({"logs", "j1", "--tail", "-3"}, "memfit logs: --tail: expected a count (0 or more) or all, got '-3'");
  expect_usage_error({"watch", "j1", "--tail", "some"}, "--tail: expected a count");
}

TEST(TopLevelHelp, ListsTheConnectionFlagsAndOutput) {
  const std::string h = p({"--help"}).out;
  for (const char* needle : {"-s, --server ADDRESS", "--token T", "--tls-ca FILE", "--tls ", "-o, --output FORMAT",
                             "MEMFIT_SERVER", "version", "completion"}) {
    EXPECT_NE(h.find(needle), std::string::npos) << needle << "\n" << h;
  }
}

TEST(Version, ParsesWithConnectionFlags) {
  const Parsed r = p({"version", "-o", "json", "--server", "h"});
  ASSERT_TRUE(r.run) << r.err;
  EXPECT_EQ(r.invocation.verb, "version");
  EXPECT_EQ(r.invocation.common.output, Output::kJson);
  EXPECT_EQ(r.invocation.common.server, "h:7540");
}

TEST(Completion, BashScriptFromTheDefinitions) {
  const Parsed r = p({"completion", "bash"});
  ASSERT_TRUE(r.run) << r.err;
  const std::string& s = r.invocation.completion_script;
  EXPECT_NE(s.find("complete -F _memfit memfit"), std::string::npos);
  // every verb, and a verb's flags, come from the definitions
  EXPECT_NE(s.find("submit get list cancel watch events logs devices estimate version completion help"), std::string::npos) << s;
  EXPECT_NE(s.find("--state) words=\"queued running cancelling succeeded failed cancelled\""), std::string::npos) << s;
  EXPECT_NE(s.find("--tail"), std::string::npos);
  expect_usage_error({"completion", "fish"}, "memfit completion: SHELL: expected bash, got 'fish'");
  expect_usage_error({"completion"}, "memfit completion: SHELL is required");
}

TEST(GetText, NotKnownYetIsADash) {
  v1::Job j;
  j.set_id("j1");
  j.set_state(v1::RUNNING);
  j.mutable_progress()->set_total_steps(10);
  std::string t = job_text(j);
  EXPECT_NE(t.find("progress    step 0/10, loss -, peak -\n"), std::string::npos) << t;
  EXPECT_EQ(t.find("0.0000"), std::string::npos) << t;
  EXPECT_EQ(t.find("peak 0 B"), std::string::npos) << t;
  j.mutable_progress()->set_step(3);
  j.mutable_progress()->set_loss(2.5);
  j.mutable_progress()->set_peak_memory_bytes(3 << 20);
  t = job_text(j);
  EXPECT_NE(t.find("progress    step 3/10, loss 2.5000, peak 3.0 MiB\n"), std::string::npos) << t;
  j.set_state(v1::SUCCEEDED);  // no measured peak: no estimate error (not inf%)
  t = job_text(j);
  EXPECT_NE(t.find("measured peak - (estimate -)"), std::string::npos) << t;
}

TEST(JsonOutput, EveryFieldEvenZero) {
  v1::Device d;
  d.set_name("cpu:0");
  const std::string all = to_json(d, false);
  EXPECT_NE(all.find("\"reserved_bytes\":\"0\""), std::string::npos) << all;
  EXPECT_NE(all.find("\"used_bytes\""), std::string::npos) << all;
  EXPECT_EQ(to_json(d, false, false), "{\"name\":\"cpu:0\"}");
  // a message not set yet is null, not left out and not zeros
  v1::Job j;
  j.set_id("j1");
  j.mutable_plan()->set_reserved_bytes(5);
  const std::string t = to_json(j, false);
  EXPECT_NE(t.find("\"progress\":null"), std::string::npos) << t;
  EXPECT_NE(t.find("\"started_at\":null"), std::string::npos) << t;
  EXPECT_NE(t.find("\"reserved_bytes\":\"5\""), std::string::npos) << t;
  EXPECT_NE(t.find("\"memory\":null"), std::string::npos) << t;  // plan.memory, one level down
}

}  // namespace
}  // namespace memfit::cli
