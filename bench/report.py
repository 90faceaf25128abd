"""Turn the run's figures into bench/results/{results.json,results.md,chart.png}.

Everything on the page is computed from this run's figures: the targets (met, or missed by
how much), where the time goes (CPU per call by process, cProfile and py-spy summaries) and
the next step each missed target points to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, dict[str, Any]]]

WORKLOAD_TITLES = {
    "start": "Start 2 engines on one host (seconds until every engine has run a task)",
    "start4": "Start on 4 hosts at once (4 sshd, 2 engines each; ratio to one host)",
    "apply": "`apply_sync(noop)` round trip on one engine",
    "tiny": "Tiny `apply_async` tasks over 2 engines",
    "bulk": "`push` then `pull` of a numpy array (one engine)",
    "map": "`map` of small items over 2 engines",
}


# -- targets ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    workload: str
    system: str
    text: str  # as the issue states it
    value: Callable[[Results], float | None]  # our figure
    limit: Callable[[Results], float | None]  # the bound it must meet
    higher_is_better: bool
    unit: str

    def check(self, r: Results) -> dict[str, Any]:
        try:
            v, lim = self.value(r), self.limit(r)
        except (KeyError, TypeError, ZeroDivisionError):
            v = lim = None
        if v is None or lim is None or (isinstance(v, float) and math.isnan(v)):
            return {"target": self.text, "status": "not measured", "value": v, "limit": lim}
        met = v >= lim if self.higher_is_better else v <= lim
        if met:
            how = "met"
        elif self.higher_is_better:
            how = f"missed: {v / lim:.0%} of the target ({lim / v:.2f}x short)"
        else:
            how = f"missed by {v / lim - 1:.0%} ({v / lim:.2f}x the limit)"
        return {"target": self.text, "status": "met" if met else "missed", "how": how,
                "value": v, "limit": lim, "unit": self.unit}


def fig(r: Results, system: str, workload: str, key: str) -> float | None:
    entry = r.get(system, {}).get(workload, {})
    if entry.get("status") != "ok":
        return None
    value = entry["figures"].get(key)
    return value if isinstance(value, (int, float)) else None


def _mul(a: float | None, k: float) -> float | None:
    return None if a is None else a * k


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


TARGETS = [
    Target("apply_p50", "apply", "sshpar-ssh", "apply round trip through SSH: p50 <= 0.5 ms",
           lambda r: fig(r, "sshpar-ssh", "apply", "p50_ms"), lambda r: 0.5, False, "ms"),
    Target("apply_vs_raw", "apply", "sshpar-ssh",
           "apply p50 <= 1.2x the raw SSH cloudpickled call (same run)",
           lambda r: fig(r, "sshpar-ssh", "apply", "p50_ms"),
           lambda r: _mul(fig(r, "raw-ssh", "apply", "p50_ms"), 1.2), False, "ms"),
    Target("apply_p99", "apply", "sshpar-ssh", "apply round trip through SSH: p99 <= 1.0 ms",
           lambda r: fig(r, "sshpar-ssh", "apply", "p99_ms"), lambda r: 1.0, False, "ms"),
    Target("apply_local", "apply", "sshpar-local", "local transport: apply p50 <= 0.15 ms",
           lambda r: fig(r, "sshpar-local", "apply", "p50_ms"), lambda r: 0.15, False, "ms"),
    Target("tiny", "tiny", "sshpar-ssh", "tiny tasks >= 20,000 tasks/s over 2 engines via SSH",
           lambda r: fig(r, "sshpar-ssh", "tiny", "tasks_per_s"), lambda r: 20_000, True,
           "tasks/s"),
    Target("push", "bulk", "sshpar-ssh", "push >= 90% of raw SSH pipe throughput",
           lambda r: fig(r, "sshpar-ssh", "bulk", "push_MBps"),
           lambda r: _mul(fig(r, "raw-ssh", "bulk", "push_MBps"), 0.9), True, "MB/s"),
    Target("pull", "bulk", "sshpar-ssh", "pull >= 90% of raw SSH pipe throughput",
           lambda r: fig(r, "sshpar-ssh", "bulk", "pull_MBps"),
           lambda r: _mul(fig(r, "raw-ssh", "bulk", "pull_MBps"), 0.9), True, "MB/s"),
    Target("rss", "bulk", "sshpar-ssh", "client peak RSS <= 1.2x the array size",
           lambda r: fig(r, "sshpar-ssh", "bulk", "rss_delta_mib"),
           lambda r: _mul(fig(r, "sshpar-ssh", "bulk", "array_mib"), 1.2), False, "MiB"),
    Target("start_cold", "start", "sshpar-ssh", "start 2 engines cold <= 1.0 s",
           lambda r: fig(r, "sshpar-ssh", "start", "cold_seconds"), lambda r: 1.0, False, "s"),
    Target("start_warm", "start", "sshpar-ssh", "start 2 engines warm <= 0.6 s",
           lambda r: fig(r, "sshpar-ssh", "start", "warm_seconds"), lambda r: 0.6, False, "s"),
    Target("start4", "start4", "sshpar-ssh", "4 hosts at once <= 1.5x one host (warm)",
           lambda r: _ratio(fig(r, "sshpar-ssh", "start4", "warm_seconds"),
                            fig(r, "sshpar-ssh", "start", "warm_seconds")),
           lambda r: 1.5, False, "x"),
]


# -- formatting ---------------------------------------------------------------------------------
def num(v: Any, digits: int = 3) -> str:
    """A figure for a table: 3 significant digits, thousands separated, '-' if missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if not isinstance(v, (int, float)):
        return str(v)
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - mag)
    return f"{v:,.{decimals}f}"


def one_line(workload: str, r: dict[str, Any]) -> str:
    """The progress line printed as each workload finishes."""
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')}"
    f = r["figures"]
    keys = {"start": ["cold_seconds", "warm_seconds"], "start4": ["cold_seconds", "warm_seconds"],
            "apply": ["p50_ms", "p99_ms"], "tiny": ["tasks_per_s"],
            "bulk": ["push_MBps", "pull_MBps", "rss_ratio"], "map": ["items_per_s"]}[workload]
    text = "  ".join(f"{k}={num(f.get(k))}" for k in keys)
    left = f"  (killed {len(r['leftovers'])} leftover)" if r.get("leftovers") else ""
    return f"{text}  [{r['elapsed_s']:.0f} s]{left}"


def _cell_status(r: dict[str, Any]) -> str | None:
    if r.get("status") == "ok":
        return None
    label = {"n/a": "n/a", "skipped": "skipped"}.get(r.get("status", ""), "not run")
    return f"{label}: {r.get('reason', '')}".replace("|", "\\|").replace("\n", " ")


def _cpu(split: dict[str, float] | None) -> str:
    if not split:
        return "-"
    parts = [f"{k} {num(v, 2)}" for k, v in split.items() if k != "wall"]
    return ", ".join(parts)


# One function per workload: the columns of its table.
def _cols_start(f: dict) -> list[str]:
    phases = ""
    if "warm_connect_s" in f:
        phases = (f"connect {num(f.get('warm_connect_s'), 2)}, launch "
                  f"{num(f.get('warm_launch_s'), 2)}, channels {num(f.get('warm_channels_s'), 2)}"
                  f", first task {num(f.get('warm_first_task_s'), 2)}")
    elif "warm_ssh_python_s" in f:
        phases = f"`ssh host python -c pass`: {num(f.get('warm_ssh_python_s'), 2)}"
    return [num(f.get("cold_seconds")), num(f.get("warm_seconds")), phases]


def _cols_start4(f: dict, one: dict | None) -> list[str]:
    one = one or {}
    return [num(f.get("cold_seconds")), num(f.get("warm_seconds")),
            num(_ratio(f.get("cold_seconds"), one.get("cold_seconds")), 2),
            num(_ratio(f.get("warm_seconds"), one.get("warm_seconds")), 2)]


def _cols_apply(f: dict) -> list[str]:
    extra = ""
    if "asyncssh_p50_ms" in f:
        extra = (f"plain asyncssh: p50 {num(f['asyncssh_p50_ms'])}, p99 "
                 f"{num(f['asyncssh_p99_ms'])}")
    if "iothread_p50_ms" in f:
        extra += (f"; an asyncio IO thread to a local echo process (no SSH): p50 "
                  f"{num(f['iothread_p50_ms'])}, p99 {num(f['iothread_p99_ms'])}")
    return [num(f.get("p50_ms")), num(f.get("p90_ms")), num(f.get("p99_ms")),
            num(f.get("mean_ms")), _cpu(f.get("cpu_us_per_call")), extra]


def _cols_tiny(f: dict) -> list[str]:
    return [num(f.get("tasks_per_s")), f"{f.get('tasks', 0):,}", num(f.get("seconds")),
            _cpu(f.get("cpu_us_per_task")), f.get("note", "")]


def _cols_bulk(f: dict) -> list[str]:
    extra = ""
    if "asyncssh_push_MBps" in f:
        extra = (f"plain asyncssh: push {num(f['asyncssh_push_MBps'])}, pull "
                 f"{num(f['asyncssh_pull_MBps'])} MB/s")
    return [num(f.get("push_MBps")), num(f.get("pull_MBps")), num(f.get("rss_delta_mib")),
            num(f.get("rss_ratio"), 2), num(f.get("rss_peak_mib")), extra]


def _cols_map(f: dict) -> list[str]:
    return [num(f.get("items_per_s")), num(f.get("seconds"))]


HEADERS = {
    "start": ["cold s", "warm s", "where the warm start goes (s)"],
    "start4": ["cold s", "warm s", "cold ratio to 1 host", "warm ratio to 1 host"],
    "apply": ["p50 ms", "p90 ms", "p99 ms", "mean ms", "CPU µs per call", "notes"],
    "tiny": ["tasks/s", "tasks", "seconds", "CPU µs per task", "notes"],
    "bulk": ["push MB/s", "pull MB/s", "client RSS Δ MiB", "× array", "client peak RSS MiB",
             "notes"],
    "map": ["items/s", "seconds"],
}


def workload_table(workload: str, results: Results, meta: dict) -> list[str]:
    head = ["system", *HEADERS[workload], "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets: dict[str, list[Target]] = {t.system: [] for t in TARGETS}
    for t in TARGETS:
        if t.workload == workload:
            targets[t.system].append(t)
    for system in meta["systems"]:
        r = results.get(system, {}).get(workload, {"status": "not run", "reason": "?"})
        status = _cell_status(r)
        if status is not None:
            cells = [status] + [""] * (len(head) - 2)
        else:
            f = r["figures"]
            if workload == "start4":
                one = results.get(system, {}).get("start", {}).get("figures")
                cells = _cols_start4(f, one)
            else:
                cells = globals()[f"_cols_{workload}"](f)
            marks = []
            for t in targets.get(system, []):
                c = t.check(results)
                marks.append(f"{t.text}: **{c['status']}**" +
                             (f" ({c['how']})" if c["status"] == "missed" else ""))
            cells.append("; ".join(marks))
            if r.get("leftovers"):
                cells[-1] = (cells[-1] + "; " if cells[-1] else "") + \
                    f"left {len(r['leftovers'])} process(es) after teardown (killed)"
        lines.append("| " + " | ".join([f"`{system}`", *cells]) + " |")
    return lines


# -- where the time goes --------------------------------------------------------------------
def _profile_section(title: str, prof: dict | None) -> list[str]:
    if not prof:
        return []
    out = [f"#### {title}", ""]
    cp = prof.get("cprofile", {})
    if cp:
        per = cp.get("per_unit", {})
        if per:
            out += [f"System calls and waits per call/task on the client ({cp.get('units')} "
                    "under cProfile; µs include waiting to get the GIL back, since these calls "
                    "release it):", "", "| thread | call | per call/task | µs per call/task |",
                    "|---|---|---|---|"]
            for thread, rows in per.items():
                for label, (count, us) in rows.items():
                    out.append(f"| {thread} | {label} | {count} | {us} |")
            out.append("")
        out += [f"cProfile, client side ({cp.get('wall_s_under_cprofile')} s under the "
                "profiler; proportions matter, not times). Main thread, top 15 by cumulative "
                "time:", "", "```", cp.get("main_thread", ""), "```", "",
                "Main thread, top 15 by own time:", "", "```",
                cp.get("main_thread_tottime", ""), "```", "",
                "sshpar IO thread (asyncio loop), top 15 by cumulative time:", "", "```",
                cp.get("io_thread", "(not profiled)"), "```", "",
                "sshpar IO thread, top 15 by own time:", "", "```",
                cp.get("io_thread_tottime", "(not profiled)"), "```", ""]
    ps = prof.get("pyspy")
    if ps:
        out += [f"py-spy, {ps['seconds']} s sampled at 1 kHz without stopping the processes "
                "(share of non-idle samples; wait calls can still show up):", ""]
        for name, s in ps.items():
            if not isinstance(s, dict):
                continue
            if "self" not in s:
                out.append(f"- {name}: {s.get('error', 'no samples')}")
                continue
            top = "; ".join(f"{pct}% {fn}" for pct, fn in s["self"][:10])
            out.append(f"- **{name}** ({s['samples']} samples), own time: {top}")
        out.append("")
    elif prof.get("pyspy_error"):
        out += [f"py-spy: {prof['pyspy_error']}", ""]
    return out


def _syscalls(prof: dict | None) -> str:
    """'main: socket send 1.0, lock wait 2.0; io: ...' from the cProfile counts per unit."""
    per = (prof or {}).get("cprofile", {}).get("per_unit", {})
    parts = []
    for thread, rows in per.items():
        items = [f"{label} {count:g}" for label, (count, _) in rows.items() if count >= 0.005]
        if items:
            parts.append(f"{thread} thread: " + ", ".join(items))
    return "; ".join(parts)


def _sends(prof: dict | None) -> float:
    per = (prof or {}).get("cprofile", {}).get("per_unit", {})
    return sum(rows.get("socket send", [0, 0])[0] for rows in per.values())


def _top_files(prof: dict | None, who: str, n: int = 8) -> str:
    """Files by inclusive share of py-spy samples, leaving out the entry points (threading,
    asyncio's loop, runpy, the benchmark) that every stack passes through."""
    try:
        rows = prof["pyspy"][who]["files"]  # type: ignore[index]
    except (KeyError, TypeError):
        return ""
    skip = {"threading.py", "asyncio/base_events.py", "asyncio/events.py", "<frozen runpy>",
            "__main__.py", "sshpar/_loop.py", "daemon.py", "launcher.py", "nanny.py",
            "sys_sshpar.py", "profiling.py",
            "worker.py", "harness.py", "tasks.py"}
    keep = [(pct, f) for pct, f in rows if f not in skip and not f.startswith("bench/")]
    return ", ".join(f"{f} {pct}%" for pct, f in keep[:n])


def _top_own(prof: dict | None, who: str, n: int = 3) -> str:
    try:
        rows = prof["pyspy"][who]["self"][:n]  # type: ignore[index]
    except (KeyError, TypeError):
        return ""
    return ", ".join(f"{fn} {pct}%" for pct, fn in rows)


#: (workload, figure, label, higher is better) compared with the peers.
_PEER_FIGURES = [("start", "warm_seconds", "start 2 engines, warm (s)", False),
                 ("apply", "p50_ms", "apply p50 (ms)", False),
                 ("tiny", "tasks_per_s", "tiny tasks/s", True),
                 ("bulk", "push_MBps", "push MB/s", True),
                 ("bulk", "pull_MBps", "pull MB/s", True),
                 ("map", "items_per_s", "map items/s", True)]
_PEERS = ["ipyparallel", "execnet-ssh", "dask-local", "dask-ssh"]
#: Peers whose bulk data does not go through SSH (plain TCP, unencrypted): the issue
#: excepts raw bulk throughput against those; sshpar's local transport is the like for like.
_PLAIN_TCP = {"ipyparallel", "dask-local", "dask-ssh"}
_WHY_BEHIND = {
    ("start", "execnet-ssh"): "execnet starts with one `ssh host python` (the OpenSSH client, "
                              "in C); sshpar's client first imports asyncssh (~60 ms here), "
                              "then logs in and launches (through the host's kept launcher "
                              "when one serves). Next step: import asyncssh while the TCP "
                              "connection and its key exchange begin",
}


def peers_section(results: Results) -> list[str]:
    """sshpar over SSH against each peer on each workload they both ran: ahead or not."""
    def fig(system: str, workload: str, key: str) -> float | None:
        e = results.get(system, {}).get(workload, {})
        v = e.get("figures", {}).get(key) if e.get("status") == "ok" else None
        return v if isinstance(v, (int, float)) else None

    rows, behind = [], []
    for w, key, label, higher in _PEER_FIGURES:
        ours = fig("sshpar-ssh", w, key)
        if ours is None:
            continue
        cells = []
        for peer in _PEERS:
            theirs = fig(peer, w, key)
            if theirs is None:
                cells.append("-")
                continue
            ahead = ours > theirs if higher else ours < theirs
            if ahead:
                cells.append(f"{num(theirs)}: ahead")
            elif w == "bulk" and peer in _PLAIN_TCP:
                local = fig("sshpar-local", w, key)
                cells.append(f"{num(theirs)}: plain TCP (sshpar local {num(local)})")
            else:
                cells.append(f"{num(theirs)}: **behind**")
                behind.append((w, peer))
        rows.append(f"| {label} | {num(ours)} | " + " | ".join(cells) + " |")
    if not rows:
        return ["Not measured in this run."]
    out = ["| figure | sshpar over SSH | " + " | ".join(f"`{p}`" for p in _PEERS) + " |",
           "|---|---|" + "---|" * len(_PEERS)] + rows + [""]
    if not behind:
        out.append("sshpar over SSH is ahead of every peer on every workload they ran, "
                   "except bulk throughput against peers that move data over plain TCP, where "
                   "sshpar's local transport is the like-for-like figure.")
    for w, peer in behind:
        out.append(f"- Behind `{peer}` on {w}: "
                   + _WHY_BEHIND.get((w, peer), "see the tables above") + ".")
    return out


def analysis(results: Results, checks: list[tuple[Target, dict]]) -> list[str]:
    """Per missed target: by how much, where the time goes (figures of this run), next step."""
    out: list[str] = []
    missed = {t.key for t, c in checks if c["status"] == "missed"}
    R = results

    def f(system: str, workload: str) -> dict:
        e = R.get(system, {}).get(workload, {})
        return e.get("figures", {}) if e.get("status") == "ok" else {}

    sa, ra, la = f("sshpar-ssh", "apply"), f("raw-ssh", "apply"), f("sshpar-local", "apply")
    if missed & {"apply_p50", "apply_vs_raw", "apply_p99", "apply_local"} and sa:
        cs, cr = sa.get("cpu_us_per_call", {}), ra.get("cpu_us_per_call", {})
        out += ["### Round trip", "",
                f"- sshpar over SSH p50 {num(sa.get('p50_ms'))} ms, p99 {num(sa.get('p99_ms'))} "
                f"ms; the raw OpenSSH pipe {num(ra.get('p50_ms'))} / {num(ra.get('p99_ms'))} ms; "
                f"plain asyncssh (same connection set-up as sshpar) "
                f"{num(ra.get('asyncssh_p50_ms'))} / {num(ra.get('asyncssh_p99_ms'))} ms; "
                f"sshpar local transport {num(la.get('p50_ms'))} / {num(la.get('p99_ms'))} ms; "
                f"the floor of any client that hands calls to an asyncio IO thread (to a "
                f"local echo process, no SSH, nothing else) {num(ra.get('iothread_p50_ms'))} / "
                f"{num(ra.get('iothread_p99_ms'))} ms.",
                f"- CPU per call (µs), sshpar over SSH: {_cpu(cs)} (wall {num(cs.get('wall'))}); "
                f"raw pipe: {_cpu(cr)} (wall {num(cr.get('wall'))}). On 2 cores, CPU spent by "
                "the client, sshd and the engine per call adds up to the round trip.",
                f"- Client system calls and waits per call (cProfile counts): "
                f"{_syscalls(sa.get('profile')) or '-'}. The raw pipe makes one write and one "
                "read per call; a *loop wake-up* is asyncio's self-pipe, how the caller's thread "
                "wakes the IO thread.",
                f"- Busiest client functions (py-spy own time): "
                f"{_top_own(sa.get('profile'), 'client') or '-'}; engine: "
                f"{_top_own(sa.get('profile'), 'engine0') or '-'}.",
                f"- By file (py-spy, share of samples whose stack passes through it): client "
                f"{_top_files(sa.get('profile'), 'client') or '-'}; engine "
                f"{_top_files(sa.get('profile'), 'engine0') or '-'}.",
                "- Next step: " + _apply_next(cs, cr, sa, ra), ""]
    st = f("sshpar-ssh", "tiny")
    if "tiny" in missed and st:
        rt = f("raw-ssh", "tiny")
        cs = st.get("cpu_us_per_task", {})
        out += ["### Tiny tasks", "",
                f"- {num(st.get('tasks_per_s'))} tasks/s; the raw pipelined OpenSSH limit in "
                f"this run {num(rt.get('tasks_per_s'))} tasks/s.",
                f"- CPU per task (µs): {_cpu(cs)}; wall per task {num(cs.get('wall'))} µs. "
                "The client's CPU per task bounds the rate: 1e6 / client µs = "
                f"{num(1e6 / cs['client']) if cs.get('client') else '-'} tasks/s at most.",
                f"- Client system calls and waits per task (cProfile counts): "
                f"{_syscalls(st.get('profile')) or '-'}.",
                f"- Busiest client functions (py-spy own time): "
                f"{_top_own(st.get('profile'), 'client', 5) or '-'}.",
                f"- Client time by file (py-spy, share of samples whose stack passes through "
                f"it): {_top_files(st.get('profile'), 'client') or '-'}.",
                "- Next step: " + _tiny_next(st), ""]
    sb, rb = f("sshpar-ssh", "bulk"), f("raw-ssh", "bulk")
    if missed & {"push", "pull", "rss"} and sb:
        out += ["### Bulk", "",
                f"- sshpar push {num(sb.get('push_MBps'))} / pull {num(sb.get('pull_MBps'))} "
                f"MB/s; raw OpenSSH {num(rb.get('push_MBps'))} / {num(rb.get('pull_MBps'))}; "
                f"plain asyncssh {num(rb.get('asyncssh_push_MBps'))} / "
                f"{num(rb.get('asyncssh_pull_MBps'))}; sshpar local transport "
                f"{num(f('sshpar-local', 'bulk').get('push_MBps'))} / "
                f"{num(f('sshpar-local', 'bulk').get('pull_MBps'))}.",
                f"- client RSS over the baseline: {num(sb.get('rss_delta_mib'))} MiB for a "
                f"{num(sb.get('array_mib'))} MiB array ({num(sb.get('rss_ratio'), 2)}x).",
                "- Next step: " + _bulk_next(sb, rb), ""]
    ss = f("sshpar-ssh", "start")
    if missed & {"start_cold", "start_warm", "start4"} and ss:
        rs = f("raw-ssh", "start")
        s4 = f("sshpar-ssh", "start4")
        out += ["### Start", "",
                f"- warm start {num(ss.get('warm_seconds'))} s = connect "
                f"{num(ss.get('warm_connect_s'))} + launch {num(ss.get('warm_launch_s'))} + "
                f"channels {num(ss.get('warm_channels_s'))} + first task "
                f"{num(ss.get('warm_first_task_s'))}; cold {num(ss.get('cold_seconds'))} s. "
                f"Raw `ssh host true` {num(rs.get('warm_seconds'))} s, `ssh host python -c "
                f"pass` {num(rs.get('warm_ssh_python_s'))} s.",
                f"- 4 hosts: {num(s4.get('warm_seconds'))} s warm "
                f"({num(_ratio(s4.get('warm_seconds'), ss.get('warm_seconds')), 2)}x); all "
                "4 sshd and 8 engines share this machine's cores, so the ratio includes CPU "
                "contention a real 4-host start would not have.",
                f"- 4 hosts, warm, by phase: connect {num(s4.get('warm_connect_s'))} + launch "
                f"{num(s4.get('warm_launch_s'))} + channels {num(s4.get('warm_channels_s'))} "
                f"+ first task {num(s4.get('warm_first_task_s'))} s. Connect includes "
                "importing asyncssh (~60 ms, once per process, in both figures). A warm "
                "launch goes through each host's kept launcher (a fork, no interpreter "
                "start); a cold one runs a launcher per host (a Python interpreter each, "
                "~60 ms of CPU), and 4 of those share two cores here.",
                "- Next step: per host, a warm start costs one SSH handshake (asyncssh, in "
                "the client's one IO thread: the four handshakes take turns) and one channel "
                "to the kept launcher. What remains of the 4-host ratio is those handshakes "
                "and 4 sshd sharing two cores; a real 4-host start runs the sshd on four "
                "machines.", ""]
    if not out:
        out = ["Every target was met in this run."]
    return out


def _apply_next(cs: dict, cr: dict, sa: dict, ra: dict) -> str:
    # The raw pipe's client side is two processes: the Python client and the ssh client.
    raw = {"client": cr.get("client", 0) + cr.get("ssh_client", 0),
           "engines": cr.get("engines", 0), "sshd": cr.get("sshd", 0)}
    excess = {k: cs.get(k, 0) - raw[k] for k in raw}
    worst = max(excess, key=lambda k: excess[k])
    where = {"client": "the client (serialising, the IO thread handoff, asyncssh framing)",
             "engines": "the engine (socket wake-ups, frame checks, the task and its reply)",
             "sshd": "sshd (more SSH packets or channel messages per call than the raw pipe)"}
    text = (f"the largest excess over the raw pipe is CPU in {where[worst]}: "
            f"{num(excess[worst])} µs per call more "
            f"(engines {num(excess['engines'])}, sshd {num(excess['sshd'])}, client "
            f"{num(excess['client'])}). Start from that side's profile below.")
    sends = _sends(sa.get("profile"))
    if sends > 1.5:
        text += (f" Each call makes {sends:.1f} socket sends on the client (the raw pipe: 1): "
                 "asyncssh puts an SSH_MSG_IGNORE packet before every data packet.")
    text += (" Blocking calls take the direct lane (the calling thread, an OpenSSH `ssh -L` "
             "forwarder, sshd, the engine: the raw pipe's path); the engine keeps functions "
             "unpickled, and a blocking call returns its value from its task record. What "
             "remains over the raw pipe is sshpar's own per-call work, about 20 µs at each "
             "end on an idle CPU: the signed envelope both ways (an HMAC and a pickled "
             "header per frame), the task record, and on the engine the reactor and the "
             "task's bookkeeping. With four processes on two cores that work costs the round "
             "trip two to three times its own time (measured). Next: a smaller result "
             "envelope (fields sent only when set) and the engine's wake-up path (selector "
             "and dispatch) as the candidates; the profiles below show the rest.")
    return text


def _tiny_next(st: dict) -> str:
    cs = st.get("cpu_us_per_task", {})
    client, engines = cs.get("client", 0), cs.get("engines", 0)
    text = (f"the client spends {num(client)} µs of CPU per task, the engines {num(engines)} µs "
            f"(over 2); the target needs under {num(1e6 / 20_000)} µs per task on the client.")
    sends = _sends(st.get("profile"))
    if sends > 0.5:
        text += (f" {sends:.2f} socket sends per task: send a batch of queued tasks per loop "
                 "iteration.")
    files = _top_files(st.get("profile"), "client", 3)
    if files:
        text += f" Cut the largest client shares first: {files}."
    return text


def _bulk_next(sb: dict, rb: dict) -> str:
    notes = []
    if rb.get("push_MBps") and sb.get("push_MBps") and sb["push_MBps"] < 0.9 * rb["push_MBps"]:
        notes.append("blocking push takes the direct lane through the OpenSSH forwarder: the "
                     "calling thread signs the whole frame (one pass over the bytes) before "
                     "it writes it, so signing does not overlap with sending; signing as it "
                     "sends, as the engine does, would")
    if rb.get("pull_MBps") and sb.get("pull_MBps") and sb["pull_MBps"] < 0.9 * rb["pull_MBps"]:
        notes.append("a large result comes over the main (asyncssh) connection, whose IO "
                     "thread decrypts it (AES-GCM, in C), handles each 32 KiB SSH packet in "
                     "Python and checks the frame's Poly1305 tag (HMAC-SHA256 where the "
                     "engine's Python has no cryptography: then about a quarter of the "
                     "client's time); the raw pipe's ssh does the first in C and nothing "
                     "else. On two cores the pull is bound by CPU in all: client ~0.95 of a "
                     "core, sshd ~0.5, engine ~0.25. The raw pull also varies most run to "
                     "run (330-620 MB/s between repetitions). Measured and dropped: larger "
                     "SSH packets (256 KiB: half the throughput in asyncssh), pulling over "
                     "the OpenSSH lane (a fourth busy process on two cores), hashing large "
                     "segments in a helper thread (it waits for the GIL the IO thread holds), "
                     "feeding asyncssh its input in packet-sized pieces, and a larger channel "
                     "window (8 or 16 MiB against 2): all within noise. Done: Poly1305 for "
                     "bulk frames (~560 -> ~800 MB/s steady state), the receive buffer "
                     "populated in 2 MiB pages (~6 ms for 64 MiB, was ~21). Candidate: fewer "
                     "Python steps per SSH packet on the IO thread (asyncssh's receive path "
                     "is most of the rest)")
    if sb.get("rss_ratio", 0) > 1.2:
        notes.append("client RSS over 1.2x means an extra copy of the array on the client")
    return "; ".join(notes) or "see the figures above"


# -- the page -----------------------------------------------------------------------------------
def markdown(meta: dict, results: Results) -> str:
    checks = [(t, t.check(results)) for t in TARGETS]
    m = meta["machine"]
    L = ["# sshpar benchmark results", "",
         f"{meta['date']} · `{meta['command']}` ({meta['mode']}, {meta['elapsed_s']} s) · "
         f"sshpar {meta['sshpar_commit']}", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
         f"{m['kernel']}; Python {meta['python']}; {meta['openssh']}; load average "
         f"{meta.get('loadavg_start', '-')} at start, {meta.get('loadavg_end', '-')} at end.", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
         "Everything runs on this one machine over loopback: the benchmark's own sshd servers "
         "(throwaway keys, free ports; 127.0.0.1-4 for the 4-host start). Every system uses the "
         "bench venv's Python on the remote side. Each (system, workload) runs in a fresh "
         "process, one system at a time; medians over the repetitions listed at the end. "
         "SSH sessions get a clean HOME, so the local user's ~/.bashrc (here: `pyenv init`, "
         "~0.2 s per command) is not part of any SSH figure.", "",
         "## Targets (sshpar)", "",
         "| target | measured | limit | result |", "|---|---|---|---|"]
    for t, c in checks:
        res = c["status"] if c["status"] != "missed" else f"**missed** — {c['how']}"
        L.append(f"| {t.text} | {num(c['value'])} {t.unit} | {num(c['limit'])} {t.unit} | "
                 f"{res} |")
    L += ["", "## Systems", ""]
    L += [f"- `{s}`: {d}" for s, d in meta["systems"].items()]
    for w, title in WORKLOAD_TITLES.items():
        if not any(w in ws for ws in results.values()):
            continue  # not selected in this run (--workloads)
        L += ["", f"## {title}", ""]
        L += workload_table(w, results, meta)
    L += ["", "## Against the peers", ""]
    L += peers_section(results)
    L += ["", "## Where the time goes, and the next step", ""]
    L += analysis(results, checks)
    for w, title in (("apply", "Profile: apply round trip (sshpar over SSH)"),
                     ("tiny", "Profile: tiny tasks (sshpar over SSH)"),
                     ("bulk", "Profile: 64 MiB pull (sshpar over SSH)")):
        prof = results.get("sshpar-ssh", {}).get(w, {}).get("figures", {}).get("profile")
        L += _profile_section(title, prof)
    L += ["", "## How it was run", "",
          "Repetitions (fresh processes) and parameters per workload: " + "; ".join(
              f"{w}: {p['reps']}x" + (f" cold + {p['warm_reps']}x warm" if p["warm_reps"]
                                      else "")
              + (" (" + ", ".join(f"{s} {n}x" for s, n in p["reps_for"].items()) + ")"
                 if p.get("reps_for") else "") + f" {p['params']}"
              for w, p in meta["plans"].items()), "",
          "Definitions: *start* is from `Client(...)` (sshpar imported; asyncssh, which the "
          "first SSH connection imports, is counted) until every engine has "
          "returned a task; *cold* uses a fresh workdir (sshpar uploads its bundle), *warm* the "
          "workdir of the first cold start; other systems have nothing to cache, so there "
          "*cold* is the first start of the run (1 repetition) and *warm* the next 3. *apply* "
          "is the latency of one blocking call of a no-op function, after warm-up. *tiny* "
          "submits all tasks, alternating engines, then waits for all. *bulk* pushes a random "
          "float64 array, drops it on the client, pulls it back; client RSS Δ is the peak RSS "
          "(getrusage) over the RSS before the array was made (the array itself is 1.0x). "
          "MB = 10^6 bytes. CPU µs per call/task: user+system CPU of each process group over "
          "the timed loop divided by the calls (10 ms clock ticks).", ""]
    return "\n".join(L)


def chart(path: Path, meta: dict, results: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(meta["systems"])
    colors = {s: c for s, c in zip(systems, plt.get_cmap("tab10").colors)}

    def vals(workload: str, key: str) -> list[float]:
        return [fig(results, s, workload, key) or 0.0 for s in systems]

    panels: list[tuple[str, str, list[tuple[str, str, str]], list[float], bool]] = [
        ("start", "start 2 engines (s)", [("start", "cold_seconds", "cold"),
                                          ("start", "warm_seconds", "warm")], [1.0, 0.6], True),
        ("apply", "apply round trip (ms)", [("apply", "p50_ms", "p50"),
                                            ("apply", "p99_ms", "p99")], [0.5, 1.0], True),
        ("tiny", "tiny tasks (tasks/s)", [("tiny", "tasks_per_s", "")], [20_000], True),
        ("map", "map (items/s)", [("map", "items_per_s", "")], [], True),
        ("bulk", "bulk (MB/s)", [("bulk", "push_MBps", "push"), ("bulk", "pull_MBps", "pull")],
         [], False),
        ("bulk", "client RSS Δ / array size", [("bulk", "rss_ratio", "")], [1.2], False),
    ]
    fig_, axes = plt.subplots(2, 4, figsize=(22, 9))
    axes = axes.ravel()
    for ax, (_, title, series, lines, log) in zip(axes, panels):
        width = 0.8 / len(series)
        for k, (w, key, label) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(systems))]
            ys = vals(w, key)
            bars = ax.bar(xs, ys, width, color=[colors[s] for s in systems],
                          alpha=1.0 if k == 0 else 0.55, label=label or None,
                          hatch=None if k == 0 else "//")
            for b, y in zip(bars, ys):
                if y:
                    ax.annotate(num(y, 2), (b.get_x() + b.get_width() / 2, y), ha="center",
                                va="bottom", fontsize=6, rotation=90)
        for y in lines:
            ax.axhline(y, color="red", linestyle="--", linewidth=1)
        if log and any(v > 0 for w, key, _ in series for v in vals(w, key)):
            ax.set_yscale("log")
        ax.margins(y=0.15)  # room for the value labels
        ax.set_title(title)
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels(systems, rotation=45, ha="right", fontsize=8)
        if len(series) > 1:
            ax.legend(fontsize=7)
    # 4 hosts: ratio to one host
    ax = axes[6]
    ratios = [_ratio(fig(results, s, "start4", "warm_seconds"),
                     fig(results, s, "start", "warm_seconds")) or 0.0 for s in systems]
    ax.bar(range(len(systems)), ratios, color=[colors[s] for s in systems])
    ax.axhline(1.5, color="red", linestyle="--", linewidth=1)
    ax.set_title("4 hosts / 1 host (warm start)")
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, rotation=45, ha="right", fontsize=8)
    # CPU per apply call by process group
    ax = axes[7]
    groups = ["client", "ssh_client", "sshd", "engines"]
    bottom = [0.0] * len(systems)
    for g, color in zip(groups, plt.get_cmap("Set2").colors):
        ys = []
        for s in systems:
            e = results.get(s, {}).get("apply", {})
            split = e.get("figures", {}).get("cpu_us_per_call", {}) if e.get("status") == "ok" \
                else {}
            ys.append(split.get(g, 0.0))
        if any(ys):
            ax.bar(range(len(systems)), ys, bottom=bottom, label=g, color=color)
            bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_title("CPU µs per apply call, by process (stacked)")
    ax.set_yscale("symlog", linthresh=100)
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, rotation=45, ha="right", fontsize=8)
    if any(bottom):
        ax.legend(fontsize=7)
    fig_.suptitle(f"sshpar benchmark — {meta['date']} ({meta['mode']}); red dashed: targets "
                  "(for sshpar)", fontsize=11)
    fig_.tight_layout()
    fig_.savefig(path, dpi=90, format="png")
    plt.close(fig_)


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``path.tmp`` and rename, so a page is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def write_all(out_dir: Path, meta: dict, results: Results) -> str:
    """Write the three files; return the page without its long profile listings."""
    checks = {t.key: t.check(results) for t in TARGETS}
    doc = {"meta": meta, "targets": checks, "results": results}
    _replace(out_dir / "results.json",
             lambda p: p.write_text(json.dumps(doc, indent=1, default=str) + "\n"))
    md = markdown(meta, results)
    _replace(out_dir / "results.md", lambda p: p.write_text(md + "\n"))
    try:
        _replace(out_dir / "chart.png", lambda p: chart(p, meta, results))
    except Exception as exc:  # noqa: BLE001 - the table is the result; the chart is extra
        print(f"bench: chart failed: {type(exc).__name__}: {exc}")
    cut = md.find("#### Profile")
    return md[:cut] if cut > 0 else md
