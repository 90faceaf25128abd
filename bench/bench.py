"""The sshpar benchmark: every workload for every system in one run, one system at a time.

Run it with ``bench/run`` (which makes bench/.venv); options:

    --quick                  small counts for a smoke run, no 4-host start
    --only SYSTEM[,SYSTEM]   run these systems only (names: see REGISTRY)
    --workloads W[,W]        run these workloads only (start, start4, apply, tiny, bulk, map)
    --keep                   keep the scratch directory (worker logs, sshd logs)
    --out DIR                write the results there instead of bench/results

It starts its own sshd servers on loopback (throwaway keys, free ports; tests/sshd.py), runs
each (system, workload) in a fresh worker process (worker.py) bounded in time, kills whatever
a worker leaves running, and writes bench/results/{results.md,results.json,chart.png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from harness import Env, SshHost, median  # noqa: E402


# -- what runs ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NA:
    """A workload that does not apply to a system, and why."""

    reason: str


WORKLOADS = ("start", "start4", "apply", "tiny", "bulk", "map")

# system -> workload -> "module:function" (run in a worker) or NA(reason).
REGISTRY: dict[str, dict[str, str | NA]] = {
    "sshpar-ssh": {w: f"sys_sshpar:{w}" for w in WORKLOADS},
    "sshpar-local": {**{w: f"sys_sshpar:{w}" for w in WORKLOADS},
                     "start4": NA("local transport: no hosts")},
    "raw-ssh": {w: f"sys_raw:{w}" for w in WORKLOADS},
    "processpool": {**{w: f"sys_pool:{w}" for w in WORKLOADS},
                    "start4": NA("one machine only")},
    "ipyparallel": {**{w: f"sys_ipyparallel:{w}" for w in WORKLOADS},
                    "start4": NA("local cluster (ipcluster), no SSH hosts")},
    "execnet-ssh": {w: f"sys_execnet:{w}" for w in WORKLOADS},
    "dask-local": {**{w: f"sys_dask:{w}" for w in WORKLOADS},
                   "start4": NA("LocalCluster: one machine")},
    "dask-ssh": {w: f"sys_dask:{w}" for w in WORKLOADS},
}

DESCRIPTIONS = {
    "sshpar-ssh": "sshpar over SSH (asyncssh transport, streamlocal channels)",
    "sshpar-local": "sshpar, local transport (subprocess engines, no SSH)",
    "raw-ssh": "raw limits: OpenSSH client (ssh true; cloudpickled call over a persistent "
               "`ssh host python` pipe; `cat` each way); asyncssh figures for the same",
    "processpool": "concurrent.futures.ProcessPoolExecutor (fork)",
    "ipyparallel": "ipyparallel, local cluster (Cluster(n=2).start_and_connect_sync())",
    "execnet-ssh": "execnet, ssh= gateways (cloudpickled calls over a channel)",
    "dask-local": "dask.distributed LocalCluster (processes, 1 thread each)",
    "dask-ssh": "dask.distributed SSHCluster (asyncssh launch; TCP comms)",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a workload runs: fresh worker processes (reps), their parameters, a time limit."""

    reps: int
    params: dict[str, Any]
    timeout: float
    warm_reps: int = 0  # start workloads: extra reps with phase "warm" (after the cold ones)
    reps_for: dict[str, int] = dataclasses.field(default_factory=dict)  # per system, if more


#: The apply target compares the p50 of two systems; one process's p50 moves by 10-20% with
#: where the scheduler puts its processes on 2 cores, so these take the median of several.
_RATIO_REPS = {"sshpar-ssh": 5, "raw-ssh": 5, "sshpar-local": 3}


def plans(quick: bool) -> dict[str, Plan]:
    if quick:
        return {
            "start": Plan(1, {"engines": 2}, 120, warm_reps=2),
            "start4": Plan(1, {"engines": 2}, 180, warm_reps=1),
            "apply": Plan(1, {"calls": 200, "warmup": 50, "profile_calls": 200}, 240),
            "tiny": Plan(1, {"tasks": 2000, "profile_tasks": 2000, "budget": 30}, 240),
            "bulk": Plan(1, {"nbytes": 8 << 20}, 180),
            "map": Plan(1, {"items": 10_000, "rounds": 1}, 240),
        }
    return {
        "start": Plan(3, {"engines": 2}, 120, warm_reps=5),
        "start4": Plan(2, {"engines": 2}, 180, warm_reps=3),
        "apply": Plan(1, {"calls": 2000, "warmup": 200, "profile_calls": 1000}, 300,
                      reps_for=_RATIO_REPS),
        "tiny": Plan(1, {"tasks": 20_000, "profile_tasks": 5000, "budget": 60}, 300),
        "bulk": Plan(5, {"nbytes": 64 << 20}, 180),
        "map": Plan(1, {"items": 100_000, "rounds": 3}, 300),
    }


# -- the environment: sshd servers, ssh_config ----------------------------------------------
def start_servers(tmp: Path, run_id: str, count: int) -> list[Any]:
    sys.path.insert(0, str(REPO))
    from tests.sshd import start_sshd

    servers = []
    # Sessions get a clean HOME: the local user's ~/.bashrc is sourced by every SSH command
    # (bash does that under sshd) and here it runs `pyenv init`, which costs ~0.2 s per
    # command and can stall 60 s on pyenv's rehash lock when sessions start at once. A remote
    # host's shell start-up is not sshpar's cost; it is noted in the results.
    home = tmp / "remote-home"
    home.mkdir(mode=0o700, exist_ok=True)
    for k in range(count):
        ip = f"127.0.0.{k + 1}"
        # BENCH_RUN marks every process started through this server, for the sweep.
        extra = (f"SetEnv BENCH_RUN={run_id} HOME={home}\n"
                 + (f"ListenAddress {ip}\n" if k else ""))
        servers.append(start_sshd(tmp / f"sshd{k}", extra_config=extra))
    return servers


def write_ssh_config(tmp: Path, servers: list[Any]) -> tuple[Path, list[SshHost]]:
    hosts = []
    lines = ["# written by bench/bench.py for this run only"]
    for k, srv in enumerate(servers):
        ip = f"127.0.0.{k + 1}"
        known = tmp / f"known_hosts{k}"
        known.write_text(f"[{ip}]:{srv.port} {srv.host_pubkey}\n")
        alias = f"bench-sshd-{k}"
        names = f"bench-sshd {alias}" if k == 0 else alias
        lines += [f"Host {names}", f"  HostName {ip}", f"  Port {srv.port}", f"  User {srv.user}",
                  f"  IdentityFile {srv.client_key_path}", "  IdentitiesOnly yes",
                  f"  UserKnownHostsFile {known}", "  GlobalKnownHostsFile /dev/null",
                  "  StrictHostKeyChecking yes", "  BatchMode yes",
                  # the same algorithms as sshpar's asyncssh transport (see sys_raw.py)
                  "  KexAlgorithms curve25519-sha256", "  Ciphers aes128-gcm@openssh.com",
                  "  Compression no", "  ControlMaster no", "  LogLevel ERROR", ""]
        hosts.append(SshHost(alias=alias, ip=ip, port=srv.port, user=srv.user,
                             key=str(srv.client_key_path), known_hosts=str(known),
                             pid=srv.proc.pid))
    cfg = tmp / "ssh_config"
    cfg.write_text("\n".join(lines))
    cfg.chmod(0o600)
    return cfg, hosts


# -- leaving nothing behind -------------------------------------------------------------------
def marked_processes(run_id: str) -> list[int]:
    """Live processes of this run (BENCH_RUN in their environment), except this one, its
    ancestors and the sshd servers (stopped at the end)."""
    mark = f"BENCH_RUN={run_id}".encode()
    spare = {os.getpid()}
    pid = os.getppid()
    while pid > 1:
        spare.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare:
            continue
        try:
            if (entry / "comm").read_text().startswith("sshd"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def sweep(run_id: str, grace: float = 5.0, spare: Iterable[int] = ()) -> list[str]:
    """Give the run's leftovers (except ``spare``) ``grace`` seconds to exit, then kill them
    (by pid). Returns the command lines of those that had to be killed."""
    deadline = time.monotonic() + grace
    spared = set(spare)
    left = [pid for pid in marked_processes(run_id) if pid not in spared]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in marked_processes(run_id) if pid not in spared]
    killed = []
    for pid in left:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{pid}: {cmd[:160]}")
        except OSError:
            pass
    return killed


# -- running one workload ---------------------------------------------------------------------
def run_worker(env_path: Path, env: Env, system: str, workload: str, function: str,
               params: dict[str, Any], timeout: float, log: Path) -> dict[str, Any]:
    out = Path(env.tmp) / f"out-{uuid.uuid4().hex[:8]}.json"
    argv = [env.python, str(BENCH / "worker.py"), str(env_path), system, workload,
            json.dumps({**params, "function": function}), str(out)]
    with open(log, "ab") as f:
        f.write(f"\n=== {system} {workload} {params}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                start_new_session=True, cwd=env.tmp)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"ok": False, "reason": f"timed out after {timeout:g} s (killed)"}
    if not out.exists():
        return {"ok": False, "reason": f"worker exited {proc.returncode} without a result "
                                       f"(log: {_tail(log)})"}
    return json.loads(out.read_text())


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def aggregate(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric figure over the reps; other values from the first rep.

    Start workloads' reps carry a phase: their figures become ``cold_<name>``/``warm_<name>``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in reps:
        groups.setdefault(r.pop("_phase", ""), []).append(r)
    out: dict[str, Any] = {}
    for phase, rs in groups.items():
        prefix = f"{phase}_" if phase else ""
        for key in rs[0]:
            values = [r[key] for r in rs if key in r]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out[prefix + key] = median(values)
                if len(values) > 1:
                    out[prefix + key + "_samples"] = values
            else:
                out[prefix + key] = values[0]
    return out


def run_workload(env_path: Path, env: Env, system: str, workload: str, function: str,
                 plan: Plan, log: Path) -> dict[str, Any]:
    from tests.helpers import kept_launchers, stop_kept_launchers

    reps = []
    if plan.warm_reps and not system.startswith("sshpar"):
        # Only sshpar has a cache to be cold or warm (its uploaded bundle): for the others the
        # first start of the run counts as cold, and fewer repetitions keep the run short.
        plan = dataclasses.replace(plan, reps=1, warm_reps=min(plan.warm_reps, 3))
    plan = dataclasses.replace(plan, reps=plan.reps_for.get(system, plan.reps))
    phases = ["cold"] * plan.reps + ["warm"] * plan.warm_reps if plan.warm_reps else \
        [""] * plan.reps
    t0 = time.perf_counter()
    leftovers: list[str] = []
    result: dict[str, Any] = {"status": "ok", "loadavg_before": os.getloadavg()[0]}
    for i, phase in enumerate(phases):
        params = {**plan.params, "rep": i, **({"phase": phase} if phase else {})}
        r = run_worker(env_path, env, system, workload, function, params, plan.timeout, log)
        # sshpar's kept launchers stay for the next start, as they would for a user's
        # (keep_launcher); they are stopped, not counted as leftovers, after the last one.
        leftovers += sweep(env.run_id, spare=kept_launchers(env.tmp))
        if not r["ok"]:
            result.update(status="failed", reason=r["reason"])
            break
        figures = r["figures"]
        if phase:
            figures["_phase"] = phase
        reps.append(figures)
    stop_kept_launchers(env.tmp)
    if reps:
        result["figures"] = aggregate(reps)
    if leftovers:
        result["leftovers"] = leftovers
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return result


# -- metadata ---------------------------------------------------------------------------------
def metadata(args: argparse.Namespace) -> dict[str, Any]:
    import platform
    from importlib import metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    def cmd(*argv: str) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
            return (p.stdout or p.stderr).strip()
        except OSError as exc:
            return str(exc)

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    commit = cmd("git", "rev-parse", "--short", "HEAD")
    dirty = bool(cmd("git", "status", "--porcelain", "--", "sshpar"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["bench/run", *sys.argv[1:]]),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
                    "kernel": platform.release(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "openssh": cmd("ssh", "-V"),
        "sshpar_commit": commit + (" + uncommitted changes in sshpar/" if dirty else ""),
        "versions": {n: version(n) for n in ("sshpar", "asyncssh", "cloudpickle", "numpy",
                                             "ipyparallel", "execnet", "dask", "distributed",
                                             "matplotlib", "py-spy")},
    }


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts; no 4-host start")
    ap.add_argument("--only", default="", help="comma-separated systems: " + ", ".join(REGISTRY))
    ap.add_argument("--workloads", default="",
                    help="comma-separated workloads (default all): " + ", ".join(WORKLOADS))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--out", default=str(BENCH / "results"),
                    help="where results.{md,json} and chart.png go (default bench/results)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite results.md and chart.png "
                    "from a results.json")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.only.split(",") if s.strip()] or list(REGISTRY)
    unknown = [s for s in args.systems if s not in REGISTRY]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()] or \
        list(WORKLOADS)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        print(report.write_all(out_dir, doc["meta"], doc["results"]))
        return 0
    load_start = round(os.getloadavg()[0], 2)
    run_id = uuid.uuid4().hex[:12]
    tmp = Path(tempfile.mkdtemp(prefix="sshpar-bench-"))
    os.environ.update({
        "BENCH_RUN": run_id,
        "SSHPAR_HOME": str(tmp / "sshpar-home"),
        "IPYTHONDIR": str(tmp / "ipython"),
        "DASK_TEMPORARY_DIRECTORY": str(tmp / "dask"),
        "DASK_CONFIG": str(tmp / "dask-config"),
        "MPLCONFIGDIR": str(tmp / "matplotlib"),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    the_plans = plans(args.quick)
    needs4 = not args.quick and "start4" in args.workloads and any(
        isinstance(REGISTRY[s]["start4"], str) for s in args.systems)
    log_dir = tmp / "logs"
    log_dir.mkdir()
    results: dict[str, dict[str, Any]] = {}
    servers: list[Any] = []
    t_run = time.perf_counter()
    try:
        servers = start_servers(tmp, run_id, 4 if needs4 else 1)
        cfg, hosts = write_ssh_config(tmp, servers)
        env = Env(run_id=run_id, repo=str(REPO), bench=str(BENCH), tmp=str(tmp),
                  python=sys.executable, ssh_config=str(cfg), hosts=hosts, quick=args.quick)
        env_path = tmp / "env.json"
        env.save(env_path)
        print(f"bench: run {run_id}, scratch {tmp}, sshd on port(s) "
              f"{', '.join(str(h.port) for h in hosts)}", flush=True)
        for system in args.systems:
            results[system] = {}
            for workload in args.workloads:
                entry = REGISTRY[system][workload]
                if isinstance(entry, NA):
                    results[system][workload] = {"status": "n/a", "reason": entry.reason}
                    continue
                if workload == "start4" and args.quick:
                    results[system][workload] = {"status": "skipped",
                                                 "reason": "--quick skips the 4-host start"}
                    continue
                print(f"bench: {system:<13} {workload:<7}", end=" ", flush=True)
                r = run_workload(env_path, env, system, workload, entry, the_plans[workload],
                                 log_dir / f"{system}.log")
                results[system][workload] = r
                print(report.one_line(workload, r), flush=True)
    finally:
        for srv in servers:
            srv.stop()
        final = sweep(run_id)
        if final:
            print(f"bench: killed {len(final)} leftover process(es) at the end", flush=True)
    meta = metadata(args)
    meta["elapsed_s"] = round(time.perf_counter() - t_run, 1)
    meta["loadavg_start"], meta["loadavg_end"] = load_start, round(os.getloadavg()[0], 2)
    meta["systems"] = {s: DESCRIPTIONS[s] for s in args.systems}
    meta["plans"] = {w: dataclasses.asdict(p) for w, p in the_plans.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    md = report.write_all(out_dir, meta, results)
    print()
    print(md)
    if args.keep:
        print(f"bench: kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
