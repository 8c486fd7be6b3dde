#!/usr/bin/python3
"""Debian's real Prometheus scraping a real memfitd with real jobs, through the shipped
deploy/prometheus/ rules and console page, and the shipped Grafana dashboard:

- what `memfit get` reports for a job reads back the same through Prometheus' HTTP API
  (a finished job stays visible for the retention, with its state);
- the Grafana dashboard (deploy/grafana/memfit.json) has the structure Grafana needs, and
  every panel's every query returns data from this Prometheus;
- the console page (deploy/prometheus/consoles/memfit.html) is served by Prometheus,
  lists the jobs, and Debian's headless Chromium draws its graphs (a screenshot with
  plotted lines, not only an HTTP 200).

Exit 77 (skipped) without the fetched data, Prometheus or Chromium."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "server"))
import daemon_harness as D  # noqa: E402

CLI = os.environ.get("MEMFIT_CLI", os.path.join(D.REPO, "build", "bin", "memfit"))
DEPLOY = os.path.join(D.REPO, "deploy")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Grafana's own variables, given values a plain query can use.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "5s"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, tmp, metrics_port):
        self.port = free_port()
        rules = os.path.join(DEPLOY, "prometheus", "memfit_rules.yml")
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            # The shipped scrape job at a test's pace (1 s instead of 15 s).
            f.write(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
                    f"rule_files: [{rules}]\n"
                    f"scrape_configs:\n  - job_name: memfitd\n"
                    f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}",
             f"--web.console.templates={DEPLOY}/prometheus/consoles",
             f"--web.console.libraries={DEPLOY}/prometheus/console_libraries"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "prometheus.log"), "w"))
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.time()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read().decode()

    def query(self, expr):
        body = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        if body["status"] != "success":
            raise RuntimeError(f"{expr}: {body}")
        return body["data"]["result"]

    def poll(self, expr, ok=lambda r: bool(r), timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                r = self.query(expr)
                if ok(r):
                    return r
            except (OSError, RuntimeError):
                r = None
            if time.time() > deadline:
                raise AssertionError(f"no data for {expr} within {timeout} s (last: {r})")
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class PrometheusEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="memfit-prom-")
        cls.d = D.Daemon("prom", devices=("cpu:0=1GiB", "cpu:1=1GiB"))
        cls.env = dict(os.environ, MEMFIT_SERVER=f"127.0.0.1:{cls.d.port}")
        cls.p = Prometheus(cls.tmp, cls.d.metrics_port)
        # A short job that ends (its series must outlive it) and a long one that runs
        # while the dashboard is read.
        cls.short = cls.d.submit(D.gpt2_spec(os.path.join(cls.tmp, "short"), steps=4)).id
        cls.long = cls.d.submit(D.gpt2_spec(os.path.join(cls.tmp, "long"), steps=100000,
                                            training={"log_interval": 10})).id
        cls.d.wait(cls.short)
        cls.d.wait(cls.long, pred=lambda j: j.state == D.pb.RUNNING and j.progress.step > 0)

    @classmethod
    def tearDownClass(cls):
        try:
            subprocess.run([CLI, "cancel", cls.long], env=cls.env, capture_output=True, timeout=60)
        finally:
            cls.p.stop()
            cls.d.stop()

    def test_prometheus_reads_what_memfit_get_reports(self):
        got = json.loads(subprocess.run([CLI, "get", self.short, "-o", "json"], env=self.env,
                                        capture_output=True, text=True, timeout=60, check=True).stdout)
        self.assertEqual(got["state"], "SUCCEEDED")
        sel = f'{{job_id="{self.short}"}}'
        r = self.p.poll(f"memfit_job_measured_peak_bytes{sel}")
        self.assertEqual(r[0]["metric"]["state"], "succeeded")  # ended, still exported
        self.assertEqual(int(float(r[0]["value"][1])), int(got["result"]["measured_peak_bytes"]))
        est = self.p.poll(f"memfit_job_estimated_peak_bytes{sel}")
        self.assertEqual(int(float(est[0]["value"][1])), int(got["plan"]["estimated_peak_bytes"]))
        res = self.p.poll(f"memfit_job_reserved_bytes{sel}")
        self.assertEqual(int(float(res[0]["value"][1])), int(got["plan"]["reserved_bytes"]))
        info = self.p.poll(f"memfit_job_info{sel}")[0]["metric"]
        self.assertEqual((info["name"], info["owner"], info["method"]), (got["name"], got["owner"], "lora"))
        # The running job's step count moves forward in Prometheus as in memfit get.
        step = int(json.loads(subprocess.run([CLI, "get", self.long, "-o", "json"], env=self.env, capture_output=True,
                                             text=True, timeout=60, check=True).stdout)["progress"]["step"])
        self.p.poll(f'memfit_job_steps{{job_id="{self.long}",state="running"}}',
                    ok=lambda r: r and float(r[0]["value"][1]) >= step)

    def test_grafana_dashboard_structure_and_every_query_has_data(self):
        with open(os.path.join(DEPLOY, "grafana", "memfit.json")) as f:
            dash = json.load(f)
        for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
            self.assertIn(key, dash)
        self.assertIsInstance(dash["schemaVersion"], int)
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        self.assertEqual((variables["datasource"]["type"], variables["datasource"]["query"]), ("datasource", "prometheus"))
        ids = [p["id"] for p in dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids must be unique")
        queries = 0
        for p in dash["panels"]:
            g = p["gridPos"]
            self.assertTrue(all(isinstance(g[k], int) for k in "hwxy"), p["title"])
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            self.assertTrue(p["title"])
            if p["type"] == "row":
                continue
            self.assertIn(p["type"], ("timeseries", "table", "stat", "gauge", "bargauge"))
            self.assertEqual(p["datasource"]["uid"], "${datasource}")
            refs = [t["refId"] for t in p["targets"]]
            self.assertEqual(len(refs), len(set(refs)), p["title"])
            for t in p["targets"]:
                expr = t["expr"]
                for var in re.findall(r"\$\{?(\w+)\}?", expr):
                    self.assertTrue(var.startswith("__") or var in variables, f"{p['title']}: ${var} undefined")
                expr = expr.replace("$device", ".*")
                for k, v in GRAFANA_VARS.items():
                    expr = expr.replace(k, v)
                r = self.p.poll(expr, timeout=90)
                self.assertTrue(r, f"{p['title']}: {expr}")
                queries += 1
        self.assertGreaterEqual(queries, 15)

    def test_console_page_lists_jobs_and_draws_graphs(self):
        self.p.poll(f'memfit_job_info{{job_id="{self.long}"}}')
        html = self.p.get("/consoles/memfit.html")
        self.assertIn(self.long, html)
        self.assertIn(self.short, html)
        self.assertIn("new PromConsole.Graph", html)
        if CHROMIUM is None:
            self.skipTest("no chromium")
        png = os.path.join(self.tmp, "console.png")
        # The console's own time control (#pctc): the graphs span what Prometheus has, so
        # their lines cross the whole width.
        span = max(30, int(time.time() - self.p.started) + 5)
        url = self.p.url + "/consoles/memfit.html#pctc" + urllib.parse.quote(json.dumps({"duration": span, "endTime": 0}))
        subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                        f"--user-data-dir={self.tmp}/chromium", "--virtual-time-budget=8000",
                        f"--screenshot={png}", "--window-size=1400,1800", url],
                       capture_output=True, timeout=120, check=True)
        import matplotlib.image as mpimg  # Debian's python3-matplotlib
        img = mpimg.imread(png)[..., :3]
        colour = (img.max(axis=2) - img.min(axis=2)) > 0.25  # plotted lines are coloured; text is grey
        # The right half holds only plot area: the coloured legend swatches sit at the left.
        right = colour[:, img.shape[1] // 2:]
        drawn = int(right.sum())
        self.assertGreater(drawn, 1500, f"the screenshot ({png}) shows {drawn} plotted pixels: no graphs drawn")
        # Each of the four graphs has plotted pixels in its own band of rows.
        rows = right.any(axis=1).nonzero()[0]
        bands = 1 + int((rows[1:] - rows[:-1] > 40).sum()) if len(rows) else 0
        self.assertGreaterEqual(bands, 4, f"{bands} bands of plotted rows in {png}")


if __name__ == "__main__":
    if not os.path.isfile(os.path.join(D.W.DATA, "gpt2", "encoder.json")):
        print("data missing: run scripts/fetch_data.sh (skipped)")
        sys.exit(77)
    if shutil.which("prometheus") is None:
        print("prometheus missing (skipped)")
        sys.exit(77)
    unittest.main(verbosity=2)
