#!/usr/bin/env python3
"""A private Slurm 22.05 test cluster on loopback (docs/SLURM.md, "Test cluster").

Brings up munged (own key and socket), slurmctld and one slurmd per node (own ports),
with fake GPUs (symlinks to /dev/null) and GPU shards, all state in one folder, and
tears it down again, stopping only the processes it started.

Python:
    with Cluster(state_dir, nodes=1, gpus=2, shards_per_gpu=4) as c:
        subprocess.run(["sbatch", ...], env=c.env)

Command line:
    cluster.py up STATE_DIR [--nodes N] [--gpus G] [--shards-per-gpu S] [--netns] ...
        prints `export SLURM_CONF=...` lines; the cluster keeps running
    cluster.py down STATE_DIR
        stops what `up` started (read from STATE_DIR/cluster.json)

Nodes: by default every slurmd runs on this host (loopback), each with its own NodeName
(`slurmd -N`) and port. With netns=True each slurmd runs in its own network namespace,
made by the harness (a bridge with one veth pair per node, private 10.x addresses, the
controller on the bridge), so the nodes are separate hosts; the namespaces and links are
removed at teardown, also on failure.

Every process the harness starts carries MEMFIT_SLURM_CLUSTER=<token> in its environment,
and so do jobs submitted with Cluster.env; slurmstepd clears its environment but holds
its node's slurmd log (in the state folder) open. Teardown cancels the jobs, stops the
daemons by process group, then kills what is left that carries this cluster's token or
holds one of its daemon logs, nothing else. Needs root (SlurmUser=root, namespaces). Standard library only.
"""

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

MARKER = "MEMFIT_SLURM_CLUSTER"
MANIFEST = "cluster.json"
BINARIES = ("unshare", "munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo",
            "scontrol", "scancel")


class ClusterError(RuntimeError):
    pass


def missing_binaries(netns=False):
    """The programs the harness needs that are not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    need = list(BINARIES) + (["ip", "nsenter"] if netns else [])
    return [b for b in need if shutil.which(b, path=path) is None]


def _which(name):
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise ClusterError(f"{name} not found on PATH or in /usr/sbin (install slurmctld "
                           "slurmd slurm-client munge; scripts/setup.sh does)")
    return found


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, lines=25):
    try:
        with open(path, "rb") as f:
            data = f.read()[-16384:].decode("utf-8", "replace").splitlines()
        return "\n".join(data[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"


def _hostname_is_loopback():
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except socket.gaierror:
        return False
    return bool(infos) and all(i[4][0].startswith("127.") for i in infos)


def _proc_environ_has(pid, needle):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def processes_with_token(token, state_dir=None):
    """PIDs of live processes of one cluster: those whose environment carries its token
    (the daemons, jobs submitted with Cluster.env) and, given its state folder, those
    holding one of its daemon log files open (slurmstepd clears its environment)."""
    needle = f"{MARKER}={token}".encode()
    logs = None
    if state_dir:
        d = os.path.realpath(state_dir)  # what /proc/PID/fd links show
        logs = (os.path.join(d, "slurmctld.log"), os.path.join(d, "slurmd-"))
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        if _proc_environ_has(name, needle) or (logs and _holds_log(name, logs)):
            found.append(int(name))
    return found


def _holds_log(pid, logs):
    ctld_log, slurmd_prefix = logs
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == ctld_log or (target.startswith(slurmd_prefix) and target.endswith(".log")):
            return True
    return False


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _die_with_parent():
    """In the child before exec: SIGKILL when the parent dies (kept across exec)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _used_ipv4_networks():
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    nets = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_network(parts[parts.index("inet") + 1], strict=False))
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                         text=True)
    for line in out.stdout.splitlines():
        words = line.split()
        if words and words[0] in ("broadcast", "local", "unicast", "unreachable", "prohibit",
                                  "blackhole", "throw", "nat", "anycast", "multicast"):
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            nets.append(ipaddress.ip_network(words[0], strict=False))
        except ValueError:
            pass
    return nets


class Cluster:
    """A private Slurm cluster in `state_dir` (created if missing, must be empty or hold
    an earlier cluster of this harness).

    nodes, gpus (per node), shards_per_gpu, cpus and memory_mb (per node) shape the
    nodes. shard_files=True writes one `Name=shard Count=S File=.../nvidiaK` line per GPU
    instead of one node-wide `Name=shard Count=G*S` line. extra_conf: more slurm.conf
    lines (e.g. SelectTypeParameters) placed before the node lines; partition_options:
    appended to the partition line. netns=True runs each slurmd in its own network
    namespace. After start(), `env` holds SLURM_CONF and the cluster token for clients.
    die_with_parent (default): the daemons get SIGKILL if the thread that started them
    dies, even by SIGKILL (PR_SET_PDEATHSIG); `cluster.py up` turns it off.
    """

    def __init__(self, state_dir, nodes=1, gpus=2, shards_per_gpu=4, cpus=4, memory_mb=4096,
                 shard_files=False, extra_conf=(), partition_options="", netns=False,
                 timeout=30.0, die_with_parent=True):
        if nodes < 1 or gpus < 0 or shards_per_gpu < 0 or cpus < 1 or memory_mb < 1:
            raise ClusterError(f"bad cluster shape: nodes={nodes} gpus={gpus} "
                               f"shards_per_gpu={shards_per_gpu} cpus={cpus} "
                               f"memory_mb={memory_mb} (nodes, cpus, memory_mb >= 1)")
        if shards_per_gpu and not gpus:
            raise ClusterError("shards_per_gpu needs gpus >= 1")
        self.dir = os.path.abspath(state_dir)
        self.nodes = nodes
        self.gpus = gpus
        self.shards_per_gpu = shards_per_gpu
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.shard_files = shard_files
        self.extra_conf = list(extra_conf)
        self.partition_options = partition_options
        self.netns = netns
        self.timeout = timeout
        self.die_with_parent = die_with_parent
        self.token = secrets.token_hex(3)
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.node_names = [f"node{i}" for i in range(nodes)]
        self.procs = {}          # name -> Popen
        self.created_netns = []  # namespaces this harness made
        self.created_links = []  # links in the root namespace this harness made
        self.env = None
        self._uts = not _hostname_is_loopback()

    # ---------- life cycle ----------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        missing = missing_binaries(self.netns)
        if missing:
            raise ClusterError("missing programs: " + " ".join(missing) +
                               " (install slurmctld slurmd slurm-client munge iproute2)")
        if os.geteuid() != 0:
            raise ClusterError("the test cluster runs its daemons as root (SlurmUser=root"
                               + (", network namespaces" if self.netns else "") + ")")
        self._prepare_dir()
        try:
            # Ctrl-C during bring-up still tears down (KeyboardInterrupt reaches except).
            self._write_manifest()
            if self.netns:
                self._make_network()
            self._write_config()
            self._start_munge()
            self._start_ctld()
            for name in self.node_names:
                self._start_slurmd(name)
            self._write_manifest()
            self.wait_idle()
        except BaseException as e:
            try:
                self.stop()
            except ClusterError as te:
                if isinstance(e, ClusterError):
                    raise ClusterError(f"{e}\n(and then {te})") from None
            raise
        return self

    def stop(self):
        """Cancel jobs, stop the daemons (TERM, then KILL), then anything left carrying
        this cluster's token; remove the namespaces and links this harness made.
        Ctrl-C is held off while it runs (in the main thread), so teardown completes."""
        in_main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self._stop()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, old)

    def _stop(self):
        errors = []
        if self.env and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                all_jobs = subprocess.run([_which("squeue"), "-h", "-o", "%i"], env=self.env,
                                          capture_output=True, text=True, timeout=5)
                ids = all_jobs.stdout.split()
                if ids:
                    subprocess.run([_which("scancel"), "--quiet"] + ids, env=self.env,
                                   capture_output=True, timeout=5)
                deadline = time.monotonic() + 5
                while ids and time.monotonic() < deadline:
                    left = subprocess.run([_which("squeue"), "-h", "-t", "R,CG,S", "-o", "%i"],
                                          env=self.env, capture_output=True, text=True,
                                          timeout=5)
                    if left.returncode != 0 or not left.stdout.strip():
                        break
                    time.sleep(0.2)
            except (subprocess.SubprocessError, OSError, ClusterError) as e:
                errors.append(f"cancelling jobs: {e}")
        # slurmd first (they may be running job steps), then the controller, munge last.
        order = [n for n in self.procs if n.startswith("slurmd")] + \
                [n for n in ("slurmctld", "munged") if n in self.procs]
        for name in order:
            self._stop_group(self.procs[name])
        for pid in processes_with_token(self.token, self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(
                _alive(p) for p in processes_with_token(self.token, self.dir)):
            time.sleep(0.05)
        left = [p for p in processes_with_token(self.token, self.dir) if _alive(p)]
        if left:
            errors.append(f"processes still alive: {left}")
        errors += self._remove_network()
        self.procs = {}
        self._write_manifest(stopped=True)
        if errors:
            raise ClusterError("teardown of " + self.dir + ": " + "; ".join(errors))

    def _stop_group(self, proc):
        """SIGTERM the daemon's process group, then SIGKILL it. The leader is reaped only
        after that, so the group id cannot have been reused by a stranger meanwhile."""
        if proc.returncode is not None:
            return  # reaped earlier: what its group left is found by the token scan
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    # ---------- state folder ----------

    def _prepare_dir(self):
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise ClusterError(f"state folder {self.dir} exists and is not a folder")
        os.makedirs(self.dir, exist_ok=True)
        entries = os.listdir(self.dir)
        man = os.path.join(self.dir, MANIFEST)
        if entries and not os.path.exists(man):
            raise ClusterError(f"state folder {self.dir} is not empty and holds no {MANIFEST}"
                               " of this harness: refusing to use it")
        if os.path.exists(man):
            with open(man) as f:
                old = json.load(f)
            if not old.get("stopped", False):
                raise ClusterError(f"{man} says a cluster is still up in {self.dir}: run "
                                   f"`{sys.argv[0]} down {self.dir}` first")
        for sub in ("ctld", "spool", "dev", "munge", "jobs"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)

    def _write_manifest(self, stopped=False):
        data = {
            "token": self.token, "stopped": stopped, "netns": self.created_netns,
            "links": self.created_links,
            "pids": {n: p.pid for n, p in self.procs.items()},
            "conf": self.conf, "nodes": self.node_names,
        }
        tmp = os.path.join(self.dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, MANIFEST))

    # ---------- network namespaces ----------

    def _ip(self, *args, check=True):
        r = subprocess.run([_which("ip")] + list(args), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise ClusterError(f"`ip {' '.join(args)}` failed (exit {r.returncode}): "
                               f"{r.stderr.strip()}")
        return r

    def _make_network(self):
        used = _used_ipv4_networks()
        net = None
        for _ in range(200):
            cand = ipaddress.ip_network(f"10.{secrets.randbelow(56) + 200}."
                                        f"{secrets.randbelow(256)}.0/24")
            if not any(cand.overlaps(u) for u in used):
                net = cand
                break
        if net is None:
            raise ClusterError("no free 10.200-255.x.0/24 network for the test hosts")
        hosts = list(net.hosts())
        self.ctl_addr = str(hosts[0])
        self.node_addrs = {n: str(hosts[i + 1]) for i, n in enumerate(self.node_names)}
        pre = f"mfs{self.token}"
        bridge = f"{pre}br"
        self._ip("link", "add", bridge, "type", "bridge")
        self.created_links.append(bridge)
        self._write_manifest()
        self._ip("addr", "add", f"{self.ctl_addr}/24", "dev", bridge)
        self._ip("link", "set", bridge, "up")
        for i, name in enumerate(self.node_names):
            ns = f"{pre}n{i}"
            host_end, ns_end = f"{pre}h{i}", f"{pre}c{i}"
            self._ip("netns", "add", ns)
            self.created_netns.append(ns)
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.created_links.append(host_end)
            self._write_manifest()
            self._ip("link", "set", ns_end, "netns", ns)
            self._ip("link", "set", host_end, "master", bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("-n", ns, "addr", "add", f"{self.node_addrs[name]}/24", "dev", ns_end)
            self._ip("-n", ns, "link", "set", ns_end, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        self.node_netns = dict(zip(self.node_names, self.created_netns))

    def _remove_network(self):
        errors = []
        for ns in list(self.created_netns):
            r = self._ip("netns", "del", ns, check=False)
            if r.returncode != 0 and "No such file" not in r.stderr:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
            else:
                self.created_netns.remove(ns)
        for link in reversed(list(self.created_links)):
            r = self._ip("link", "del", link, check=False)
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                errors.append(f"ip link del {link}: {r.stderr.strip()}")
            else:
                self.created_links.remove(link)
        return errors

    # ---------- configuration ----------

    def _write_config(self):
        d = self.dir
        self.ctld_port = free_port()
        if not self.netns:
            self.ctl_addr = "127.0.0.1"
            self.node_addrs = {n: "127.0.0.1" for n in self.node_names}
            self.node_ports = {n: free_port() for n in self.node_names}
            self.node_netns = {}
        else:
            port = free_port()
            self.node_ports = {n: port for n in self.node_names}
        self.munge_socket = os.path.join(d, "munge", "munge.socket")
        gres_lines = ["AutoDetect=off"]
        node_gres = []
        if self.gpus:
            node_gres.append(f"gpu:{self.gpus}")
            if self.shards_per_gpu:
                node_gres.append(f"shard:{self.gpus * self.shards_per_gpu}")
        for name in self.node_names:
            os.makedirs(os.path.join(d, "spool", name), exist_ok=True)
            devdir = os.path.join(d, "dev", name)
            os.makedirs(devdir, exist_ok=True)
            for k in range(self.gpus):
                link = os.path.join(devdir, f"nvidia{k}")
                if os.path.islink(link):
                    os.unlink(link)
                os.symlink("/dev/null", link)
            if not self.gpus:
                continue
            files = os.path.join(devdir, f"nvidia[0-{self.gpus - 1}]")
            gres_lines.append(f"NodeName={name} Name=gpu File={files}")
            if self.shards_per_gpu:
                if self.shard_files:
                    for k in range(self.gpus):
                        gres_lines.append(f"NodeName={name} Name=shard Count={self.shards_per_gpu} "
                                          f"File={os.path.join(devdir, f'nvidia{k}')}")
                else:
                    gres_lines.append(f"NodeName={name} Name=shard "
                                      f"Count={self.gpus * self.shards_per_gpu}")
        with open(os.path.join(d, "gres.conf"), "w") as f:
            f.write("\n".join(gres_lines) + "\n")
        # slurmctld accepts `localhost` as its own name whatever the hostname is; another
        # name must be the hostname ("This host (...) not a valid controller"): with netns
        # the controller runs with hostname `ctl` (see _spawn).
        ctl_name = "localhost" if not self.netns else "ctl"
        if self.netns:
            self.hosts_file = os.path.join(d, "hosts")
            with open(self.hosts_file, "w") as f:
                f.write("127.0.0.1 localhost\n" + f"{self.ctl_addr} ctl\n" +
                        "".join(f"{a} {n}\n" for n, a in self.node_addrs.items()))
        lines = [
            f"# Written by memfit's tests/slurm/cluster.py (token {self.token}).",
            "ClusterName=memfittest",
            f"SlurmctldHost={ctl_name}({self.ctl_addr})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={next(iter(self.node_ports.values()))}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"StateSaveLocation={d}/ctld",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # Without a default a job gets the whole node's memory and jobs never share it.
            f"DefMemPerCPU={max(1, self.memory_mb // self.cpus)}",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            "GresTypes=gpu,shard",
            "ReturnToService=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MinJobAge=300",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            "KillWait=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
        ] + self.extra_conf
        gres = f" Gres={','.join(node_gres)}" if node_gres else ""
        for name in self.node_names:
            port = f" Port={self.node_ports[name]}" if not self.netns else ""
            lines.append(f"NodeName={name} NodeAddr={self.node_addrs[name]}{port} "
                         f"CPUs={self.cpus} RealMemory={self.memory_mb}{gres} State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
                     f"{self.partition_options}".rstrip())
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.env = dict(os.environ)
        self.env.update({"SLURM_CONF": self.conf, MARKER: self.token})

    # ---------- daemons ----------

    def _spawn(self, name, argv, netns=None, host=None):
        if netns:
            # nsenter switches only the network namespace: `ip netns exec` also remounts
            # /sys, which hides /sys/fs/cgroup and slurmd then fails ("No filesystem
            # mounted on /sys/fs/cgroup").
            argv = [_which("nsenter"), f"--net=/run/netns/{netns}"] + argv
        if host:
            # A test host: its own hostname, and (in a private mount namespace) a hosts file
            # naming the controller and the nodes, so that with NoCtldInAddrAny and
            # NoInAddrAny each daemon binds to its own test address and nothing else.
            argv = [_which("unshare"), "--uts", "--mount", "--propagation", "private", "sh",
                    "-c", f'mount --bind "$0" /etc/hosts && hostname {host} && exec "$@"',
                    self.hosts_file] + argv
        elif self._uts:
            # The daemons bind to what the hostname resolves to (NoInAddrAny): give them
            # a private UTS namespace whose hostname is localhost.
            argv = [_which("unshare"), "--uts", "sh", "-c",
                    'hostname localhost && exec "$@"', "sh"] + argv
        log = open(os.path.join(self.dir, f"{name}.out"), "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=self.env, start_new_session=True, cwd=self.dir,
                                 preexec_fn=_die_with_parent if self.die_with_parent else None)
        finally:
            log.close()
        self.procs[name] = p
        self._write_manifest()
        return p

    def _start_munge(self):
        m = os.path.join(self.dir, "munge")
        key = os.path.join(m, "munge.key")
        if not os.path.exists(key):
            r = subprocess.run([_which("mungekey"), "-c", "-k", key], capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise ClusterError(f"mungekey -c -k {key} failed: {r.stderr.strip()}")
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), "munged's socket "
                   f"{self.munge_socket}", [f"{m}/munged.log", f"{self.dir}/munged.out"],
                   procs=["munged"])

    def _start_ctld(self):
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf],
                    host="ctl" if self.netns else None)

    def _start_slurmd(self, name):
        self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", self.conf],
                    netns=self.node_netns.get(name), host=name if self.netns else None)

    def _logs(self):
        paths = [os.path.join(self.dir, "slurmctld.log"), os.path.join(self.dir, "slurmctld.out")]
        for n in self.node_names:
            paths += [os.path.join(self.dir, f"slurmd-{n}.log"),
                      os.path.join(self.dir, f"slurmd-{n}.out")]
        return paths

    def _wait(self, ready, what, logs, procs=(), timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        last = None
        while time.monotonic() < deadline:
            for n in procs:
                p = self.procs.get(n)
                if p is not None and p.poll() is not None:
                    raise ClusterError(f"{n} exited with status {p.returncode} while waiting "
                                       f"for {what}\n" + self._log_tails(logs))
            try:
                r = ready()
            except Exception as e:  # noqa: BLE001 - reported below
                r, last = False, e
            if r:
                return r
            time.sleep(0.1)
        raise ClusterError(f"timed out after {timeout or self.timeout:.0f} s waiting for {what}"
                           + (f" (last error: {last})" if last else "") + "\n"
                           + self._log_tails(logs))

    @staticmethod
    def _log_tails(paths):
        out = []
        for p in paths:
            if os.path.exists(p) and os.path.getsize(p):
                out.append(f"--- tail of {p} ---\n{_tail(p)}")
        return "\n".join(out)

    def node_states(self):
        r = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %T"], env=self.env,
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise ClusterError(f"sinfo failed: {r.stderr.strip()}")
        states = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def wait_idle(self, timeout=None):
        """Wait until every node is idle; the error holds the daemons' log tails."""
        daemons = ["munged", "slurmctld"] + [f"slurmd-{n}" for n in self.node_names]

        def ready():
            st = self.node_states()
            self._last_states = st
            return all(st.get(n) == "idle" for n in self.node_names)
        self._last_states = {}
        try:
            self._wait(ready, "all nodes idle", self._logs(), procs=daemons, timeout=timeout)
        except ClusterError as e:
            raise ClusterError(f"{e}\nnode states: {self._last_states}") from None

    # ---------- helpers for tests ----------

    def run(self, *argv, check=True, timeout=30):
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed (exit {r.returncode}): "
                               f"{r.stderr.strip()}")
        return r

    def sbatch(self, *args, script="#!/bin/sh\nenv\n"):
        """Submit a job (stdin script); returns the job id."""
        r = subprocess.run([_which("sbatch"), "--parsable"] + list(args), input=script,
                           env=self.env, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed (exit {r.returncode}): "
                               f"{r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job -d` as a dict of key=value (plus 'GRES_IDX' per node)."""
        r = self.run(_which("scontrol"), "show", "job", "-d", str(job_id))
        info = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
                if k == "GRES":
                    info.setdefault("GRES_LIST", []).append(v)
        return info


def _down(state_dir):
    """Stop a cluster started with `up` from its manifest: only PIDs whose environment
    still carries the recorded token, and the namespaces and links it recorded."""
    man = os.path.join(os.path.abspath(state_dir), MANIFEST)
    try:
        with open(man) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ClusterError(f"{man} not found: {state_dir} holds no cluster of this harness")
    token = data["token"]
    needle = f"{MARKER}={token}".encode()
    conf = data.get("conf")
    ctld = data.get("pids", {}).get("slurmctld")
    if conf and ctld and _proc_environ_has(ctld, needle):
        env = dict(os.environ, SLURM_CONF=conf)
        try:
            ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                                 text=True, timeout=5).stdout.split()
            if ids:
                subprocess.run(["scancel", "--quiet"] + ids, env=env, capture_output=True,
                               timeout=5)
        except (subprocess.SubprocessError, OSError):
            pass  # what is left is killed by token below
    for name, pid in data.get("pids", {}).items():
        if _proc_environ_has(pid, needle):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            _alive(p) for p in processes_with_token(token, state_dir)):
        time.sleep(0.1)
    for pid in processes_with_token(token, state_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for ns in data.get("netns", []):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for link in reversed(data.get("links", [])):
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    data.update(stopped=True, pids={}, netns=[], links=[])
    with open(man, "w") as f:
        json.dump(data, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster and leave it running")
    up.add_argument("state_dir")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--gpus", type=int, default=2, help="fake GPUs per node")
    up.add_argument("--shards-per-gpu", type=int, default=4)
    up.add_argument("--cpus", type=int, default=4)
    up.add_argument("--memory-mb", type=int, default=4096)
    up.add_argument("--shard-files", action="store_true",
                    help="one `Name=shard Count=S File=nvidiaK` line per GPU")
    up.add_argument("--conf", action="append", default=[], metavar="LINE",
                    help="an extra slurm.conf line (repeatable)")
    up.add_argument("--partition-options", default="")
    up.add_argument("--netns", action="store_true",
                    help="each slurmd in its own network namespace")
    up.add_argument("--timeout", type=float, default=30.0)
    down = sub.add_parser("down", help="stop a cluster started with `up`")
    down.add_argument("state_dir")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "down":
            _down(a.state_dir)
            return 0
        c = Cluster(a.state_dir, nodes=a.nodes, gpus=a.gpus, shards_per_gpu=a.shards_per_gpu,
                    cpus=a.cpus, memory_mb=a.memory_mb, shard_files=a.shard_files,
                    extra_conf=a.conf, partition_options=a.partition_options, netns=a.netns,
                    timeout=a.timeout, die_with_parent=False)
        c.start()
        # The daemons outlive this process: detach from them without stopping them.
        print(f"export SLURM_CONF={c.conf}")
        print(f"export {MARKER}={c.token}")
        return 0
    except ClusterError as e:
        print(f"cluster.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
