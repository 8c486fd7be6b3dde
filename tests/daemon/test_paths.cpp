// Where a job's files may be (server/daemon/paths.h) and the confined file access under it
// (proto/spec/confined.h): the pure decisions, then the checks against a real folder with
// links planted the way a hostile user would plant them.
#include "paths.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "confined.h"

namespace memfit::daemon {
namespace {

namespace fs = std::filesystem;

PathRules Rules() {
  PathRules r;
  r.read_roots = {"/models", "/data/{user}"};
  r.write_roots = {"/data/{user}/runs"};
  r.state_dir = "/var/lib/memfit";
  r.jobs_dir = "/var/lib/memfit/jobs";
  return r;
}

template <typename F>
PathError::Kind KindOf(F&& f) {
  try {
    f();
  } catch (const PathError& e) {
    return e.kind;
  }
  ADD_FAILURE() << "no PathError";
  return PathError::Kind::kInvalid;
}

TEST(Paths, Lexical) {
  EXPECT_EQ(fsx::NormalAbsolute("/a//b/./c/"), "/a/b/c");
  EXPECT_EQ(fsx::NormalAbsolute("/a/../etc"), "");
  EXPECT_EQ(fsx::NormalAbsolute("rel/a"), "");
  EXPECT_TRUE(fsx::IsBeneath("/data/alice/x", "/data/alice"));
  EXPECT_FALSE(fsx::IsBeneath("/data/alice2/x", "/data/alice"));
  EXPECT_TRUE(fsx::IsBeneath("/anything", "/"));
  EXPECT_EQ(fsx::RelativeTo("/data/alice/x/y", "/data/alice"), "x/y");
}

TEST(Paths, UserNamesInRoots) {
  EXPECT_TRUE(PathSafeUser("alice.b-c_9"));
  for (const char* bad : {"", ".", "..", "a/b", "a b", "\x1b[31m"}) EXPECT_FALSE(PathSafeUser(bad)) << bad;
  EXPECT_EQ(ExpandRoots({"/data/{user}", "/m"}, "bob"), (std::vector<std::string>{"/data/bob", "/m"}));
  // A name that cannot stand in a path loses the roots that name {user}.
  EXPECT_EQ(ExpandRoots({"/data/{user}", "/m"}, "../root"), (std::vector<std::string>{"/m"}));
}

TEST(Paths, InputsMustLieBeneathTheCallersRoots) {
  const PathRules r = Rules();
  EXPECT_EQ(InputRoot(r, "alice", "data.train_path", "/data/alice/t.txt"), "/data/alice");
  EXPECT_EQ(InputRoot(r, "alice", "model.config_path", "/models/gpt2/config.json"), "/models");
  EXPECT_EQ(KindOf([&] { InputRoot(r, "alice", "data.train_path", "/data/bob/t.txt"); }), PathError::Kind::kDenied);
  EXPECT_EQ(KindOf([&] { InputRoot(r, "alice", "model.config_path", "/etc/shadow"); }), PathError::Kind::kDenied);
  EXPECT_EQ(KindOf([&] { InputRoot(r, "alice", "x", "/data/alice/../bob/t"); }), PathError::Kind::kInvalid);
  EXPECT_EQ(KindOf([&] { InputRoot(r, "alice", "x", "rel.txt"); }), PathError::Kind::kInvalid);
  EXPECT_EQ(KindOf([&] { InputRoot(r, "alice", "x", "/var/lib/memfit/memfit.db"); }), PathError::Kind::kDenied);
  try {
    InputRoot(r, "alice", "model.config_path", "/etc/shadow");
  } catch (const PathError& e) {
    EXPECT_NE(std::string(e.what()).find("model.config_path"), std::string::npos);
  }
  PathRules none;
  none.state_dir = "/s";
  EXPECT_EQ(KindOf([&] { InputRoot(none, "alice", "x", "/data/x"); }), PathError::Kind::kDenied);
}

TEST(Paths, OutputsGoToTheJobsFolderOrBeneathAWriteRoot) {
  const PathRules r = Rules();
  OutputPlace o = DecideOutput(r, "alice", "j1", "");
  EXPECT_EQ(o.dir, "/var/lib/memfit/jobs/j1/output");
  EXPECT_EQ(o.root, "/var/lib/memfit/jobs/j1");
  EXPECT_TRUE(o.in_state_dir);
  o = DecideOutput(r, "alice", "j1", "/data/alice/runs/a");
  EXPECT_EQ(o.root, "/data/alice/runs");
  EXPECT_FALSE(o.in_state_dir);
  EXPECT_EQ(KindOf([&] { DecideOutput(r, "alice", "j1", "/data/bob/runs/a"); }), PathError::Kind::kDenied);
  EXPECT_EQ(KindOf([&] { DecideOutput(r, "alice", "j1", "/etc/x"); }), PathError::Kind::kDenied);
  EXPECT_EQ(KindOf([&] { DecideOutput(r, "alice", "j1", "/var/lib/memfit/jobs/j0/output"); }), PathError::Kind::kDenied);
  EXPECT_EQ(KindOf([&] { DecideOutput(r, "alice", "j1", "/data/alice/runs/../../bob"); }), PathError::Kind::kInvalid);
  PathRules none;
  none.state_dir = "/s";
  none.jobs_dir = "/s/jobs";
  EXPECT_EQ(KindOf([&] { DecideOutput(none, "alice", "j1", "/tmp/x"); }), PathError::Kind::kDenied);
}

// A real folder tree: root/alice (the user's), root/outside (not theirs).
class Confined : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memfit-paths-XXXXXX";
    base_ = mkdtemp(tmpl);
    fs::create_directories(base_ + "/alice/data");
    fs::create_directories(base_ + "/outside");
    write(base_ + "/alice/data/train.txt", "hello");
    write(base_ + "/outside/secret", "s3cret");
    rules_.read_roots = {base_ + "/{user}"};
    rules_.write_roots = {base_ + "/{user}"};
    rules_.state_dir = base_ + "/state";
    rules_.jobs_dir = base_ + "/state/jobs";
    rules_.max_input_bytes = 1000;
  }
  void TearDown() override { fs::remove_all(base_); }
  static void write(const std::string& p, const std::string& s) { std::ofstream(p) << s; }
  std::string base_;
  PathRules rules_;
};

TEST_F(Confined, InputChecks) {
  CheckInput(rules_, "alice", "data.train_path", base_ + "/alice/data/train.txt", false);
  // A link inside the root to a file outside it: refused when opened, whatever the name.
  fs::create_symlink(base_ + "/outside/secret", base_ + "/alice/data/link.txt");
  EXPECT_EQ(KindOf([&] { CheckInput(rules_, "alice", "data.train_path", base_ + "/alice/data/link.txt", false); }),
            PathError::Kind::kDenied);
  // A relative link that stays beneath the root is followed (Hugging Face caches use them).
  fs::create_symlink("train.txt", base_ + "/alice/data/rel.txt");
  CheckInput(rules_, "alice", "data.train_path", base_ + "/alice/data/rel.txt", false);
  // Not a regular file: a device, a folder.
  fs::create_symlink("/dev/zero", base_ + "/alice/data/zero");
  EXPECT_NE(KindOf([&] { CheckInput(rules_, "alice", "data.train_path", base_ + "/alice/data/zero", false); }),
            PathError::Kind::kPrecondition);
  EXPECT_EQ(KindOf([&] { CheckInput(rules_, "alice", "data.train_path", base_ + "/alice/data", false); }),
            PathError::Kind::kDenied);
  CheckInput(rules_, "alice", "data.tokenizer_path", base_ + "/alice/data", /*folder_ok=*/true);
  // Too large.
  write(base_ + "/alice/data/big.txt", std::string(1001, 'x'));
  EXPECT_EQ(KindOf([&] { CheckInput(rules_, "alice", "data.train_path", base_ + "/alice/data/big.txt", false); }),
            PathError::Kind::kInvalid);
  // Missing: named, and nothing of another file is ever quoted.
  try {
    CheckInput(rules_, "alice", "data.validation_path", base_ + "/alice/none.txt", false);
    ADD_FAILURE();
  } catch (const PathError& e) {
    EXPECT_NE(std::string(e.what()).find("data.validation_path"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos);
  }
  try {
    ReadInput(rules_, "alice", "model.config_path", base_ + "/alice/data/link.txt", 100);
    ADD_FAILURE();
  } catch (const PathError& e) {
    EXPECT_EQ(std::string(e.what()).find("s3cret"), std::string::npos);
  }
}

TEST_F(Confined, OutputFoldersAreClaimedOnceAndNeverReused) {
  const OutputPlace o = DecideOutput(rules_, "alice", "j1", base_ + "/alice/runs/a");
  CheckOutput(o);  // absent: fine
  ClaimOutput(o, "j1", -1, -1);
  std::ifstream m(base_ + "/alice/runs/a/.memfit-job");
  std::string id;
  m >> id;
  EXPECT_EQ(id, "j1");
  // A second job cannot claim it.
  EXPECT_EQ(KindOf([&] { ClaimOutput(o, "j2", -1, -1); }), PathError::Kind::kPrecondition);
  EXPECT_EQ(KindOf([&] { CheckOutput(o); }), PathError::Kind::kPrecondition);
  // A folder with the user's own files is refused, and left as it was.
  fs::create_directories(base_ + "/alice/runs/b/adapter");
  write(base_ + "/alice/runs/b/adapter/important.bin", "keep");
  const OutputPlace b = DecideOutput(rules_, "alice", "j3", base_ + "/alice/runs/b");
  EXPECT_EQ(KindOf([&] { CheckOutput(b); }), PathError::Kind::kPrecondition);
  EXPECT_TRUE(fs::exists(base_ + "/alice/runs/b/adapter/important.bin"));
  // A link where the folder should be: refused, nothing created through it.
  fs::create_symlink(base_ + "/outside", base_ + "/alice/runs/c");
  const OutputPlace c = DecideOutput(rules_, "alice", "j4", base_ + "/alice/runs/c/deeper");
  EXPECT_EQ(KindOf([&] { ClaimOutput(c, "j4", -1, -1); }), PathError::Kind::kDenied);
  EXPECT_FALSE(fs::exists(base_ + "/outside/deeper"));
  ReleaseOutput(o);
  EXPECT_FALSE(fs::exists(base_ + "/alice/runs/a"));
}

// A root with {user} filled in passes through a folder the user may own: a link put
// there must not move the root (to another user's folder, or the state dir).
TEST_F(Confined, ALinkInPlaceOfAUsersRootIsNotFollowed) {
  fs::create_directories(base_ + "/bob/runs");
  fs::create_symlink(base_ + "/bob", base_ + "/mallory");
  const OutputPlace o = DecideOutput(rules_, "mallory", "j1", base_ + "/mallory/runs/x");
  EXPECT_EQ(KindOf([&] { ClaimOutput(o, "j1", -1, -1); }), PathError::Kind::kDenied);
  EXPECT_FALSE(fs::exists(base_ + "/bob/runs/x"));
  write(base_ + "/bob/secret.txt", "bob's");
  EXPECT_EQ(KindOf([&] { CheckInput(rules_, "mallory", "data.train_path", base_ + "/mallory/secret.txt", false); }),
            PathError::Kind::kDenied);
  fsx::set_input_roots({base_ + "/mallory"});
  EXPECT_THROW(fsx::InputFile(base_ + "/mallory/secret.txt"), fsx::FsError);
  fsx::set_input_roots({});
}

// Two jobs claiming nested folders at the same moment (a and a/x): never both.
TEST_F(Confined, NestedClaimsRacingNeverBothWin) {
  int both = 0, one = 0;
  for (int round = 0; round < 200; ++round) {
    const std::string a = base_ + "/alice/n" + std::to_string(round);
    const OutputPlace outer = DecideOutput(rules_, "alice", "A", a);
    const OutputPlace inner = DecideOutput(rules_, "alice", "B", a + "/x");
    std::atomic<int> wins{0};
    std::thread ta([&] {
      try {
        ClaimOutput(outer, "A", -1, -1);
        ++wins;
      } catch (const PathError&) {
      }
    });
    std::thread tb([&] {
      try {
        ClaimOutput(inner, "B", -1, -1);
        ++wins;
      } catch (const PathError&) {
      }
    });
    ta.join();
    tb.join();
    (wins == 2 ? both : one) += 1;
  }
  EXPECT_EQ(both, 0);
  EXPECT_GT(one, 0);
  // One after the other: the inner folder of a claimed one is refused, and so is an
  // outer folder holding a claimed one (it is not empty).
  const OutputPlace outer = DecideOutput(rules_, "alice", "C", base_ + "/alice/seq");
  ClaimOutput(outer, "C", -1, -1);
  EXPECT_EQ(KindOf([&] { ClaimOutput(DecideOutput(rules_, "alice", "D", base_ + "/alice/seq/adapter"), "D", -1, -1); }),
            PathError::Kind::kPrecondition);
  const OutputPlace deep = DecideOutput(rules_, "alice", "E", base_ + "/alice/p/q");
  ClaimOutput(deep, "E", -1, -1);
  EXPECT_EQ(KindOf([&] { CheckOutput(DecideOutput(rules_, "alice", "F", base_ + "/alice/p")); }),
            PathError::Kind::kPrecondition);
}

TEST_F(Confined, OutputOperationsNeverFollowLinks) {
  const std::string out = base_ + "/alice/runs/x";
  fsx::Dir d = fsx::Dir::open_below(base_ + "/alice", out, true);
  // Planted links: a file link and a folder link to the outside.
  fs::create_symlink(base_ + "/outside/secret", out + "/metrics.jsonl");
  fs::create_directories(out + "/checkpoints");
  fs::create_symlink(base_ + "/outside", out + "/checkpoints/step-000000000");
  EXPECT_THROW(d.open("metrics.jsonl", O_WRONLY | O_APPEND), fsx::FsError);
  EXPECT_THROW(d.open("checkpoints/step-000000000/state.json", O_WRONLY | O_CREAT, 0640), fsx::FsError);
  EXPECT_THROW(d.write_file_atomic("checkpoints/step-000000000/x", "y"), fsx::FsError);
  // Removing the tree removes the links, never what they point to.
  d.remove_tree("checkpoints");
  EXPECT_TRUE(fs::exists(base_ + "/outside/secret"));
  std::ifstream s(base_ + "/outside/secret");
  std::string text;
  s >> text;
  EXPECT_EQ(text, "s3cret");
  EXPECT_FALSE(fs::exists(out + "/checkpoints"));
  d.write_file_atomic("ok.json", "{}");
  EXPECT_EQ(d.read_file("ok.json"), "{}");
}

// Bounded race: a thread swaps a folder for a link to the outside over and over while
// another writes beneath it; nothing may ever land outside.
TEST_F(Confined, SwappingAFolderForALinkNeverWritesOutside) {
  const std::string out = base_ + "/alice/runs/race";
  fsx::Dir d = fsx::Dir::open_below(base_ + "/alice", out, true);
  std::atomic<bool> stop{false};
  std::thread swapper([&] {
    std::mt19937 rng(7);
    while (!stop) {
      std::error_code ec;
      fs::remove_all(out + "/ck", ec);
      if (rng() % 2) {
        fs::create_symlink(base_ + "/outside", out + "/ck", ec);
      } else {
        fs::create_directory(out + "/ck", ec);
      }
    }
  });
  int written = 0;
  for (int i = 0; i < 3000; ++i) {
    try {
      d.write_file_atomic("ck/f" + std::to_string(i % 10), "x");
      ++written;
    } catch (const fsx::FsError&) {
    }
  }
  stop = true;
  swapper.join();
  for (const auto& e : fs::directory_iterator(base_ + "/outside")) EXPECT_EQ(e.path().filename(), "secret");
  RecordProperty("writes_that_landed", written);
}

TEST_F(Confined, WorkerInputRoots) {
  fsx::set_input_roots({base_ + "/alice"});
  EXPECT_EQ(fsx::InputFile(base_ + "/alice/data/train.txt").read_all(), "hello");
  EXPECT_THROW(fsx::InputFile(base_ + "/outside/secret"), fsx::FsError);
  fs::create_symlink(base_ + "/outside/secret", base_ + "/alice/data/l");
  EXPECT_THROW(fsx::InputFile(base_ + "/alice/data/l"), fsx::FsError);
  fsx::set_input_roots({});
  EXPECT_EQ(fsx::InputFile(base_ + "/outside/secret").read_all(), "s3cret");  // a manual run: unconfined
}

}  // namespace
}  // namespace memfit::daemon
