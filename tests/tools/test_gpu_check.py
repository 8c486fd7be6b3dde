"""The GPU check's plumbing, on this machine (CTest gpu_check_ci): the carried Debian
packages unpack into a private prefix, the CLI builds against that prefix and LibTorch
alone, the prefix check catches a build that used the system's headers, and the step
runner measures every step on tiny inputs and writes its summary and results.

    python3 tests/tools/test_gpu_check.py            # what CTest runs
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEPS = os.path.join(REPO, ".gpu-deps")


def sh(argv, **kw):
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, **kw)


class GpuCheck(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.exists(os.path.join(DEPS, "MANIFEST")):
            p = sh(["scripts/gpu/deps.sh", "download"])
            if p.returncode != 0:
                raise unittest.SkipTest("cannot download the Debian packages: " + p.stderr[-300:])
        cls.out = tempfile.mkdtemp(prefix="memfit-gpu-ci-")
        cls.run_ci = sh(["scripts/gpu_check.sh", "--ci"], env=dict(os.environ, OUT=cls.out,
                                                                   MEMFIT_JOBS=os.environ.get("MEMFIT_JOBS", "2")))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)

    def results(self):
        with open(os.path.join(self.out, "results.json")) as f:
            return {s["name"]: s for s in json.load(f)["steps"]}

    def test_ci_run_passes(self):
        self.assertEqual(self.run_ci.returncode, 0, self.run_ci.stdout[-3000:] + self.run_ci.stderr[-2000:])
        with open(os.path.join(self.out, "check.log")) as f:
            log = f.read()
        self.assertIn(" 0 from outside the prefix", log)
        self.assertTrue(os.path.exists(os.path.join(self.out, "summary.md")))

    def test_every_step_measured(self):
        r = self.results()
        self.assertEqual(sorted(r), ["ablation", "bench", "daemon", "estimator", "headline", "tests"])
        for name, step in r.items():
            self.assertEqual(step["status"], "ok", f"{name}: {step.get('errors')}")
            self.assertTrue(step["markdown"].strip(), name)
        tests = r["tests"]["data"]
        self.assertGreater(tests["ops"]["passed"], 100)
        self.assertEqual(tests["ops"]["failed"], [])
        bw = r["bench"]["data"]["bandwidth"]
        self.assertGreater(bw["copy_bytes_per_s"], 0)
        self.assertEqual(len(bw["bandwidth"]), 5)
        for row in bw["bandwidth"]:
            self.assertGreater(row["fwd_fraction"], 0)
            self.assertGreater(row["bwd_fraction"], 0)

    def test_logs_packed(self):
        with tarfile.open(os.path.join(self.out, "logs.tar.gz")) as t:
            names = t.getnames()
        self.assertTrue(any(n.endswith("build.log") for n in names), names[:20])
        self.assertTrue(any(n.endswith("step1_tests.log") for n in names), names[:20])

    def test_prefix_check_catches_system_headers(self):
        # The main build compiled against the system's protobuf, gRPC and yaml-cpp: the
        # check must name them.
        build = os.path.join(REPO, "build")
        if not os.path.exists(os.path.join(build, "build.ninja")):
            self.skipTest("no main build")
        torch_lib = os.path.dirname(sh(["sh", "-c", "dpkg -L libtorch1.13 | grep -m1 /libtorch.so"]).stdout.strip())
        p = sh([sys.executable, "scripts/gpu/check_prefix.py", "--build", build, "--prefix",
                os.path.join(REPO, "build-gpu-prefix"), "--torch-lib", torch_lib,
                "--torch-package", "libtorch-dev", "--programs", "bin/memfit"])
        self.assertEqual(p.returncode, 1, p.stdout[-2000:])
        for pkg in ("libprotobuf-dev", "libgrpc++-dev", "libyaml-cpp-dev", "libabsl-dev", "nlohmann-json3-dev"):
            self.assertIn(f"({pkg})", p.stdout)
        self.assertIn("header /usr/include/google/protobuf/message.h (libprotobuf-dev)", p.stdout)
        # Debian's LibTorch loads the system's protobuf itself, so here the programs'
        # libraries are not held against the main build (on the GPU machine they are).

    @unittest.skipUnless(os.environ.get("MEMFIT_FULL_GPU_REHEARSAL") == "1",
                         "the full rehearsal runs with MEMFIT_FULL_GPU_REHEARSAL=1")
    def test_full_rehearsal(self):
        with tempfile.TemporaryDirectory() as out:
            p = sh(["scripts/gpu_check.sh", "--rehearse"], env=dict(os.environ, OUT=out))
            self.assertEqual(p.returncode, 0, p.stdout[-3000:] + p.stderr[-2000:])
            with open(os.path.join(out, "results.json")) as f:
                steps = json.load(f)["steps"]
            self.assertEqual([s["status"] for s in steps], ["ok"] * 6, [s.get("errors") for s in steps])

    def test_unpack_refuses_root_and_tampered_packages(self):
        p = sh(["scripts/gpu/deps.sh", "unpack", "/"])
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("refusing to unpack into /", p.stderr)
        with tempfile.TemporaryDirectory() as d:
            fake = os.path.join(d, "deps")
            shutil.copytree(DEPS, fake)
            victim = sorted(f for f in os.listdir(fake) if f.endswith(".deb"))[0]
            with open(os.path.join(fake, victim), "ab") as f:
                f.write(b"tampered")
            p = sh(["scripts/gpu/deps.sh", "unpack", os.path.join(d, "prefix")],
                   env=dict(os.environ, MEMFIT_GPU_DEPS=fake))
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(f"{victim} does not match", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
